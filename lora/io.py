"""Adapter files: write the kohya/LyCORIS layout (A1111, ComfyUI, Forge, sd-scripts) or diffusers/peft's, and read
those: sd-scripts LoRA and LoCon, LyCORIS LoCon (with Tucker cores), DoRA, LoHa and LoKr, diffusers/peft LoRA and
DoRA."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from atomic import atomic_path

from . import names, packed
from .inject import candidates, freeze_base, named_lora_layers, set_module
from .base import Adapter
from .inject import ADAPTERS
from .layer import wrap
from .loha import LoHa
from .lokr import LoKr

FORMATS = ("kohya", "diffusers")
SCALING_KEY = "lora_scaling"  # our metadata: "alpha/r" or "alpha/sqrt(r)" (how the file's alphas were meant)

# ------------------------------------------------------------------------------------ model parts

_TE_ATTRS = ("text_encoder", "te", "cond_stage_model", "clip", "text", "conditioner")
# dict keys for SDXL's towers given one by one
_TE_KEYS = {"te1": "te1", "text_encoder_1": "te1", "te2": "te2", "text_encoder_2": "te2"}


def _is_unet(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("input_blocks", "middle_block", "output_blocks"))


def _is_sdxl_unet(module: nn.Module) -> bool:
    """SDXL's UNet is the one that takes y (label_emb); sd-scripts names its modules by LDM paths."""
    return getattr(getattr(module, "cfg", None), "adm_in_channels", None) is not None


def _text_parts(module: nn.Module) -> dict[str, nn.Module]:
    """{'te': encoder} for SD1/SD2; SDXL's pair of towers (embedders 0 and 1) -> {'te1': CLIP-L, 'te2': OpenCLIP}."""
    embedders = getattr(module, "embedders", None)
    if isinstance(embedders, nn.ModuleList) and len(embedders) == 2:
        return {"te1": embedders[0], "te2": embedders[1]}
    return {"te": module}


def model_parts(model: Any) -> dict[str, nn.Module]:
    """{'unet': ..., 'te': ...} (SDXL: 'te1', 'te2') from a UNet, a text encoder, a dict of them, or an object with
    .unet / .text_encoder. Dict keys: 'unet', 'text_encoder' (an SDXL text encoder splits into both towers),
    and for SDXL's towers one by one 'text_encoder_1'/'te1' and 'text_encoder_2'/'te2'."""
    if isinstance(model, dict):
        parts = {}
        for key, module in model.items():
            if key == "unet":
                parts["unet"] = module
            elif key in _TE_KEYS:
                parts[_TE_KEYS[key]] = module
            elif key in _TE_ATTRS:
                parts.update(_text_parts(module))
            else:
                raise ValueError(f"unknown model part {key!r}; use 'unet' and 'text_encoder' "
                                 f"(SDXL towers one by one: 'text_encoder_1', 'text_encoder_2')")
        return parts
    if isinstance(model, nn.Module) and _is_unet(model):
        return {"unet": model}
    if isinstance(getattr(model, "unet", None), nn.Module):
        parts = {"unet": model.unet}
        for attr in _TE_ATTRS:
            if isinstance(getattr(model, attr, None), nn.Module):
                parts.update(_text_parts(getattr(model, attr)))
                break
        return parts
    if isinstance(model, nn.Module):
        return _text_parts(model)
    raise TypeError(f"expected a UNet, a text encoder, a dict of them, or an object with .unet; got {type(model)}")


def num_res_blocks(unet: nn.Module) -> int:
    cfg = getattr(unet, "cfg", None)
    if cfg is not None and hasattr(cfg, "num_res_blocks"):
        return int(cfg.num_res_blocks)
    # The first Downsample sits right after the first level's res blocks.
    for i, block in enumerate(unet.input_blocks):
        if hasattr(block[0], "op"):
            return i - 1
    return len(unet.input_blocks) - 1


def _namer(part: str, module: nn.Module):
    n = num_res_blocks(module) if part == "unet" else None
    xl = part == "unet" and _is_sdxl_unet(module)
    return lambda path, fmt: (names.kohya_name(path, part, n, sdxl=xl) if fmt == "kohya"
                              else names.diffusers_name(path, part, n))


SDXL_BASE_VERSION = "sdxl_base_v1-0"  # what sd-scripts writes for SDXL


def base_model_version(model: Any, parts: dict[str, nn.Module]) -> str:
    """sd-scripts' ss_base_model_version: 'sd_v1', 'sd_v2', with '_v' for v-prediction when the model says so;
    'sdxl_base_v1-0' for SDXL.

    model: what was given to save/load (its .version and .prediction_type are used when it has them);
    parts: model_parts(model), read when the model does not say its version.
    """
    version = getattr(model, "version", None)
    if version == "sdxl" or "te2" in parts or ("unet" in parts and _is_sdxl_unet(parts["unet"])):
        return SDXL_BASE_VERSION
    if version in ("sd1", "sd2"):
        v2 = version == "sd2"
    else:
        cfg = getattr(parts.get("unet"), "cfg", None)
        # SD2's UNet is the one with linear transformer projections (and 1024-wide context at full size).
        v2 = cfg is not None and (getattr(cfg, "use_linear_in_transformer", False) or cfg.context_dim == 1024)
    suffix = "_v" if getattr(model, "prediction_type", None) == "v_prediction" else ""
    return ("sd_v2" if v2 else "sd_v1") + suffix


# ------------------------------------------------------------------------------------------ save

def _factors(layer: Adapter) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of a LoRA layer for the file, with alpha / rank == the layer's scale whatever its scaling rule.

    A PiSSA layer's change from the true W0 is s·(B·A − B0·A0): a rank-2r LoRA [B, −B0]·[A; A0].
    """
    down, up = layer.lora_down.weight.detach(), layer.lora_up.weight.detach()
    if layer.pissa:
        down = torch.cat([down, layer.pissa_down0.to(down.dtype)], dim=0)
        up = torch.cat([up, -layer.pissa_up0.to(up.dtype)], dim=1)
    rank = down.shape[0]
    return down, up, layer.scale * rank


def kohya_tensors(layer: Adapter) -> dict[str, torch.Tensor]:
    """One layer's tensors in the kohya/LyCORIS layout, keyed by the suffix after the module name: lora_down.weight,
    lora_up.weight (+ lora_mid.weight, dora_scale), hada_*, lokr_*; and alpha, written so that alpha / r is the
    layer's scale (the rule of every reader; r = rank, or the file's rank for PiSSA's rank-2r export)."""
    if layer.pissa:
        down, up, alpha = _factors(layer)
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(alpha))}
    return {**layer.adapter_state_dict(), "alpha": torch.tensor(float(layer.scale * layer.rank))}


def _diffusers_tensors(layer: Adapter, path: str) -> dict[str, torch.Tensor]:
    """A LoRA or DoRA layer in the diffusers/peft layout (suffixes lora_A.weight, lora_B.weight, and DoRA's
    lora_magnitude_vector: (out,), or (1, out, 1, 1) for a conv, as peft keeps it), alpha/r folded into B."""
    if layer.kind not in ("lora", "dora") or getattr(layer, "lora_mid", None) is not None:
        what = "a Tucker core (lora_mid)" if layer.kind in ("lora", "dora") else layer.kind
        raise ValueError(f"{path}: diffusers/peft files have no layout for {what}; save it with format='kohya' "
                         f"(the LyCORIS layout, which A1111, ComfyUI and LyCORIS read)")
    # diffusers/peft readers take alpha = rank when a file has none: fold alpha/r into B.
    down, up, alpha = _factors(layer)
    out = {"lora_A.weight": down, "lora_B.weight": (up.float() * (alpha / down.shape[0])).to(up.dtype)}
    if layer.kind == "dora":
        if not layer.wd_on_output:
            raise ValueError(f"{path}: peft's DoRA norms output channels; this layer norms input channels "
                             f"(wd_on_output=False): save it with format='kohya'")
        m = layer.dora_scale.detach().flatten()
        out["lora_magnitude_vector"] = m.view(1, -1, 1, 1) if layer.is_conv else m
    return out


def _packed_tensors(layer: packed.PackedLoRA, part: str, path: str, format: str) -> dict[str, torch.Tensor]:
    """A packed q/k/v layer as the three modules sd-scripts and diffusers name ('lora_te2_text_model_encoder_layers_N_
    self_attn_q_proj', ...; 'text_encoder_2.text_model.encoder.layers.N.self_attn.q_proj' with alpha/r in B)."""
    out = {}
    hf_names = names.te_packed_to_hf(path)
    for x, (down, up, alpha) in packed.file_factors(layer).items():
        if format == "kohya":
            key = names.KOHYA_PREFIX[part] + hf_names[x].replace(".", "_")
            out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(alpha))})
        else:
            key = names.DIFFUSERS_PREFIX[part] + hf_names[x]
            out.update({f"{key}.lora_A.weight": down,
                        f"{key}.lora_B.weight": (up.float() * (alpha / down.shape[0])).to(up.dtype)})
    return out


def lora_state_dict(model: Any, format: str = "kohya", *, name: str | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors save() writes, keyed as in the file."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; expected one of {FORMATS}")
    def cast(t: torch.Tensor) -> torch.Tensor:
        return (t if dtype is None or t.ndim == 0 else t.to(dtype)).contiguous()

    out: dict[str, torch.Tensor] = {}
    for part, module in model_parts(model).items():
        namer = _namer(part, module)
        seen: dict[str, str] = {}
        for path, layer in named_lora_layers(module, name):
            if path in seen:
                raise ValueError(f"{path} carries several LoRAs ({seen[path]!r}, {layer.name!r}); "
                                 f"pass name= to choose which one to save")
            seen[path] = layer.name
            if isinstance(layer, packed.PackedLoRA):  # OpenCLIP's q/k/v thirds: q_proj, k_proj, v_proj in the file
                out.update({k: cast(t) for k, t in _packed_tensors(layer, part, path, format).items()})
                continue
            if format == "kohya":
                key = namer(path, "kohya")
                tensors = kohya_tensors(layer)
            else:
                key = names.DIFFUSERS_PREFIX[part] + namer(path, "diffusers")
                tensors = _diffusers_tensors(layer, path)
            out.update({f"{key}.{suffix}": cast(t.detach()) for suffix, t in tensors.items()})
    if not out:
        raise ValueError("the model has no LoRA layers" + ("" if name is None else f" named {name!r}"))
    return out


def lycoris_args(layers: list[Adapter]) -> dict[str, str] | None:
    """ss_network_args as sd-scripts writes LyCORIS's --network_args (every value a string), or None for plain LoRA,
    which is sd-scripts' own networks.lora. algo: lora (for DoRA and Tucker LoCon too), loha or lokr."""
    kinds = Counter(layer.kind for layer in layers)
    tucker = any(getattr(layer, "tucker", False) or getattr(layer, "lora_mid", None) is not None for layer in layers)
    if set(kinds) == {"lora"} and not tucker:
        return None
    kind = kinds.most_common(1)[0][0]
    args = {"algo": {"dora": "lora", "lora": "locon"}.get(kind, kind)}
    conv = [layer for layer in layers if any(k > 1 for k in layer.weight.shape[2:])]
    if conv:
        args.update(conv_dim=str(conv[0].rank), conv_alpha=f"{conv[0].scale * conv[0].rank:g}")
    if tucker:
        args["use_tucker"] = "True"
    if kind == "dora":
        args["dora_wd"] = "True"
        if not layers[0].wd_on_output:
            args["wd_on_output"] = "False"
    if kind == "lokr":
        first = next(layer for layer in layers if layer.kind == "lokr")
        args["factor"] = str(first.factor)
        for flag in ("decompose_both", "full_matrix"):
            if getattr(first, flag):
                args[flag] = "True"
    return args


def _stringify(metadata: dict[str, Any]) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def save(path: str | os.PathLike, model: Any, format: str = "kohya", *, name: str | None = None,
         dtype: torch.dtype | None = None, metadata: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the LoRA of `model` (a UNet, a text encoder, or both) to a .safetensors file; return its metadata.

    kohya: 'lora_unet_<diffusers name>.lora_down.weight' / '.lora_up.weight' / '.alpha', with the
    sd-scripts metadata (ss_network_dim, ss_network_alpha, ss_base_model_version, ...). Alphas are
    written so that alpha / rank is each layer's scale, which is what every reader computes; rsLoRA is
    noted in 'lora_scaling' so that load() can give the original alpha back. The other adapters are
    written as LyCORIS writes them ('.lora_mid.weight', '.dora_scale', '.hada_w1_a', '.lokr_w1', ...), with
    ss_network_module 'lycoris.kohya' and ss_network_args {"algo": ..., ...} as sd-scripts records them.
    diffusers: 'unet.<diffusers name>.lora_A.weight' / '.lora_B.weight' with alpha/rank folded into B, and
    '.lora_magnitude_vector' for DoRA (peft's layout); LoHa, LoKr and Tucker cores have no diffusers layout.
    metadata: extra entries (e.g. the training config); non-string values are stored as JSON.
    The write is atomic: a temp file in the same folder, then os.replace.
    """
    tensors = lora_state_dict(model, format, name=name, dtype=dtype)
    parts = model_parts(model)
    layers = [layer for module in parts.values() for _, layer in named_lora_layers(module, name)]
    meta: dict[str, Any] = {"format": "pt"}
    if format == "kohya":
        rs = {layer.rs for layer in layers}
        ranks = Counter(layer.rank for layer in layers)
        alphas = Counter(layer.scale * layer.rank for layer in layers)
        conv = [layer for layer in layers if any(k > 1 for k in layer.weight.shape[2:])]
        version = base_model_version(model, parts)
        lycoris = lycoris_args(layers)
        meta.update({
            "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
            "ss_network_dim": str(ranks.most_common(1)[0][0]),
            "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}",
            "ss_base_model_version": version,
            "ss_v2": str(version.startswith("sd_v2")),
            SCALING_KEY: "alpha/sqrt(r)" if rs == {True} else "alpha/r",
        })
        if lycoris:
            meta["ss_network_args"] = json.dumps(lycoris)
        elif conv:
            meta["ss_network_args"] = json.dumps({"conv_dim": str(conv[0].rank),
                                                  "conv_alpha": f"{conv[0].scale * conv[0].rank:g}"})
        if any(layer.pissa for layer in layers):
            meta["lora_init"] = "pissa (saved as the rank-2r change from the original weights)"
    meta.update(metadata or {})
    meta = _stringify(meta)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return meta


# ------------------------------------------------------------------------------------------ read

@dataclass
class FileEntry:
    """One module's tensors in a LoRA file, as parse_entries() groups them (factors as stored, not reshaped).

    factors: every tensor but alpha under its kohya/LyCORIS suffix ('lora_down.weight', 'dora_scale', 'hada_w1_a',
    'lokr_w2_b', ...; diffusers files are read into the same names, their magnitude as 'lora_magnitude_vector');
    down and up repeat the LoRA pair."""
    part: str
    module: str          # the module name as the file spells it
    fmt: str             # "kohya" or "diffusers": which naming `module` follows
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)


# The LyCORIS/kohya suffixes after a module name (besides alpha), by adapter.
KOHYA_FACTORS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "dora": ("dora_scale",),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
_ROLES = "|".join(re.escape(r) for names_ in KOHYA_FACTORS.values() for r in names_) + "|alpha"
_KOHYA_KEY = re.compile(rf"(lora_unet|lora_te\d?)_(.+?)\.({_ROLES})")
_KOHYA_ANY = re.compile(r"(lora_unet|lora_te\d?)_([^.]+)\.(.+)")
# diffusers/peft suffixes: current peft, the LoRACompatible layers (~0.19-0.24), and attention processors.
_DIFF_SUFFIXES = [
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora_magnitude_vector", "lora_magnitude_vector"), (".lora_magnitude_vector.weight", "lora_magnitude_vector"),
    (".alpha", "alpha"),
]
# What we recognise but do not implement, by key fragment.
_UNSUPPORTED = [
    (".diff", "full weight differences (.diff)"),
    ("oft_", "OFT"), ("boft_", "BOFT"), ("ia3", "IA3"), ("lokr_t1", "LoKr with a Tucker core on W1 (lokr_t1)"),
]


def _fix_diffusers_module(part: str, module: str) -> str:
    """Old diffusers names -> module names: attention processors and to_*_lora text-encoder keys."""
    module = module.replace(".processor.", ".")
    if part in names.TEXT_PARTS:
        for old, new in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "out_proj")):
            if module.endswith(f"self_attn.{old}"):
                return module[: -len(old)] + new
    elif module.endswith(".to_out"):
        return module + ".0"
    return module


def parse_entries(tensors: dict[str, torch.Tensor]) -> tuple[dict[tuple[str, str, str], FileEntry], dict[str, list[str]]]:
    """Group a file's tensors by module: {(part, module name as the file spells it, format): FileEntry}.

    Also returns {problem: [keys]} for the keys we cannot use (unsupported LoRA types, unknown keys), for
    describe_problems(). A FileEntry may lack its down or up weight: callers check.
    """
    entries: dict[tuple[str, str, str], FileEntry] = {}
    problems: dict[str, list[str]] = {}

    def add(part: str, module: str, fmt: str, role: str, key: str) -> None:
        entry = entries.setdefault((part, module, fmt), FileEntry(part, module, fmt))
        if role == "alpha":
            entry.alpha = float(tensors[key].float().item())
        else:
            role = {"down": "lora_down.weight", "up": "lora_up.weight"}.get(role, role)
            entry.factors[role] = tensors[key]
            if role == "lora_down.weight":
                entry.down = tensors[key]
            elif role == "lora_up.weight":
                entry.up = tensors[key]
        entry.keys.append(key)

    for key in tensors:
        unsupported = next((what for frag, what in _UNSUPPORTED if frag in key), None)
        if unsupported:
            problems.setdefault(f"unsupported LoRA type: {unsupported}", []).append(key)
            continue
        m = _KOHYA_KEY.fullmatch(key)
        if m:
            prefix, module, role = m.groups()
            part = {"lora_unet": "unet", "lora_te": "te", "lora_te1": "te1", "lora_te2": "te2"}.get(prefix)
            if part is None:
                problems.setdefault("unknown kohya prefix", []).append(key)
                continue
            add(part, f"{prefix}_{module}", "kohya", role, key)
            continue
        if _KOHYA_ANY.fullmatch(key):
            problems.setdefault("unknown kohya key suffix", []).append(key)
            continue
        suffix = next(((s, role) for s, role in _DIFF_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            problems.setdefault("unknown key", []).append(key)
            continue
        module = key[: -len(suffix[0])].removeprefix("base_model.model.")
        if module.startswith("text_encoder_2."):
            part, module = "te2", module[len("text_encoder_2."):]
        elif module.startswith("unet."):
            part, module = "unet", module[len("unet."):]
        elif module.startswith("text_encoder."):
            part, module = "te", module[len("text_encoder."):]
        else:
            part = "te" if module.startswith("text_model.") else "unet"
        add(part, _fix_diffusers_module(part, module), "diffusers", suffix[1], key)
    return entries, problems


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata: .safetensors (with its header metadata) or a torch file holding a flat
    dict of tensors (no metadata). Raises FileNotFoundError, or ValueError with one line that names the file: empty,
    truncated or corrupt, or a pickle that would need to run code (refused, never executed)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA file at {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # safetensors has its own error type for bad headers and short files
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text or "Unpickl" in type(err).__name__:
            raise ValueError(f"{path}: refused: this pickle needs objects other than tensors to load, and loading it "
                             f"could run code; convert it to .safetensors with a tool you trust") from None
        raise ValueError(f"{path}: not a readable LoRA file (truncated or corrupt?): "
                         f"{text.splitlines()[0] if text else type(err).__name__}") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors")
    return data, {}


def _as_weight_shape(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """1x1 conv factors and linear factors are the same numbers: reshape between them."""
    if t.ndim == 4 and ndim == 2 and t.shape[2:] == (1, 1):
        return t.flatten(1)
    if t.ndim == 2 and ndim == 4:
        return t[:, :, None, None]
    return t


# OpenCLIP (SD2, SDXL's second text encoder) keeps q, k, v in one (3w, w) tensor; a LoRA for q_proj is a LoRA for
# one third of it (lora/packed.py).
_PACKED = re.compile(r"(.+)\.in_proj_weight\[([qkv])\]")


def _packed_qkv(te: nn.Module) -> dict[str, str]:
    """{'text_model.encoder.layers.N.self_attn.q_proj': '<attn path>.in_proj_weight[q]', ...} for OpenCLIP."""
    out = {}
    for path, _ in packed.targets(te):
        try:
            hf_names = names.te_packed_to_hf(path)
        except ValueError:
            continue  # a packed attention outside an OpenCLIP tower: nothing in a file names it
        for x, hf in hf_names.items():
            out[hf] = f"{path}.{packed.WEIGHT}[{x}]"
    return out


def _target_weight(module: nn.Module, mpath: str) -> torch.Tensor:
    """The weight a LoRA entry changes: a module's weight, or a view of a third of a packed q/k/v tensor (the stored
    one, W0, also when PackedLoRA layers are on it)."""
    m = _PACKED.fullmatch(mpath)
    if m:
        w = packed.base_weight(module.get_submodule(m.group(1)))
        n = w.shape[0] // 3
        i = "qkv".index(m.group(2))
        return w[i * n:(i + 1) * n]  # a view, so merging into it changes the packed tensor
    return module.get_submodule(mpath).weight


def peft_configs(metadata: dict[str, str], path: str) -> dict[str, dict]:
    """diffusers' 'lora_adapter_metadata' (peft LoraConfig fields, keyed 'unet.lora_alpha' ...) by model part:
    {'unet': {...}, 'te': {...}, 'te2': {...}}; {} when the file has none. `path` only names the file in errors."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable lora_adapter_metadata ({err})") from err
    if "lora_alpha" in data or "r" in data:  # written by a single model, without a part prefix
        return {"unet": data, "te": data, "te2": data}
    out: dict[str, dict] = {}
    for key, value in data.items():
        prefix, _, name = key.partition(".")
        part = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}.get(prefix)
        if part:
            out.setdefault(part, {})[name] = value
    return out


def entry_alpha(entry: FileEntry, rank: int, rs_file: bool, peft: dict[str, dict]) -> tuple[float, bool]:
    """(alpha, rank-stabilised?) for one module of a file, so that its scale is alpha/r (or alpha/sqrt(r)).

    The order: the module's own .alpha tensor (rs_file: the file's metadata says alpha/sqrt(r), see save(); or, in a
    diffusers file, its peft config says use_rslora); then the peft config of its part (peft_configs(), with
    alpha_pattern); else alpha = rank (scale 1). An alpha of 0 counts as none, as sd-scripts and LyCORIS read it:
    scale 1, not an update switched off.
    """
    config = peft.get(entry.part) if entry.fmt == "diffusers" else None
    if entry.alpha:
        if rs_file:  # our rsLoRA files hold alpha·sqrt(r), so that alpha_file / r is the scale for every reader
            return entry.alpha / math.sqrt(rank), True
        return entry.alpha, bool(config and config.get("use_rslora", False))
    if config:
        alpha = config.get("lora_alpha", rank)
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?({pattern})", entry.module):  # peft's rule for pattern keys
                alpha = value
                break
        return float(alpha), bool(config.get("use_rslora", False))
    return float(rank), False  # no alpha anywhere: alpha = rank, scale 1


@dataclass
class LoadedLoRA:
    """What load() did: the adapter name (for set_multiplier / merge / remove), the modules, the file's metadata."""
    name: str
    path: str
    format: str
    modules: list[str]
    merged: bool
    skipped: list[str]
    metadata: dict[str, str]


def describe_problems(path: str, problems: dict[str, list[str]], hints: list[str]) -> str:
    """The error message for a file that cannot be used: each problem with (up to 12 of) its keys, then hints."""
    lines = [f"cannot load LoRA file {path}: nothing was changed."]
    for what, items in problems.items():
        shown = "".join(f"\n      {x}" for x in items[:12])
        more = f"\n      ... and {len(items) - 12} more" if len(items) > 12 else ""
        lines.append(f"  - {what} ({len(items)}):{shown}{more}")
    lines += [f"  hint: {h}" for h in hints]
    return "\n".join(lines)


def entry_kind(entry: FileEntry) -> str:
    """'lora', 'dora', 'loha' or 'lokr' from a module's factor names; a ValueError names what does not fit."""
    f = entry.factors
    kinds = [k for k in ("lora", "loha", "lokr") if any(n in f for n in KOHYA_FACTORS[k])]
    dora = "dora_scale" in f or "lora_magnitude_vector" in f
    if len(kinds) > 1:
        raise ValueError("modules with the factors of several adapter types")
    if not kinds or kinds == ["lora"]:
        if entry.down is None or entry.up is None:
            raise ValueError("modules missing their down or up weight")
        return "dora" if dora else "lora"
    if dora:
        raise ValueError("unsupported LoRA type: DoRA on LoHa/LoKr (dora_scale beside hada_*/lokr_*, LyCORIS's dora_wd "
                         "with algo loha or lokr) is not built; LoHa, LoKr and DoRA on LoRA factors are")
    if kinds == ["loha"]:
        if not all(n in f for n in KOHYA_FACTORS["loha"][:4]) or ("hada_t1" in f) != ("hada_t2" in f):
            raise ValueError("LoHa modules missing some of hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (or a core)")
        return "loha"
    if not ("lokr_w1" in f or {"lokr_w1_a", "lokr_w1_b"} <= f.keys()) or \
            not ("lokr_w2" in f or {"lokr_w2_a", "lokr_w2_b"} <= f.keys()):
        raise ValueError("LoKr modules missing W1 (lokr_w1, or lokr_w1_a and lokr_w1_b) or W2")
    return "lokr"


def entry_rank(kind: str, entry: FileEntry) -> int:
    """The rank r of alpha/r: the inner size of the low-rank factors (a LoKr with both factors full has none: 1)."""
    f = entry.factors
    if kind in ("lora", "dora"):
        return entry.down.shape[0]
    if kind == "loha":
        return f["hada_w1_b"].shape[0]
    low = f.get("lokr_w1_b", f.get("lokr_w2_b"))
    return 1 if low is None else low.shape[0]


def _stand_in(module: nn.Module, mpath: str) -> nn.Module:
    """The layer an entry adapts: the module at mpath, or, for a third of OpenCLIP's packed q/k/v, an nn.Linear
    holding a copy of that third (to compute what merging adds to it)."""
    if not _PACKED.fullmatch(mpath):
        return module.get_submodule(mpath)
    w = _target_weight(module, mpath)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return linear


def copy_factors(layer: Adapter, factors: dict[str, torch.Tensor]) -> None:
    """Put a file's factors into `layer`, whose tensors carry the same names; ValueError on a missing name or shape.

    The same numbers in another arrangement are accepted: a 1x1 conv's (r, in, 1, 1) for a linear (r, in), a kernel
    kept flat or not, and peft's magnitude (out,) or (1, out, 1, 1) for dora_scale."""
    own = {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}
    given = {("dora_scale" if n == "lora_magnitude_vector" else n): t for n, t in factors.items()}
    if given.keys() != own.keys():
        raise ValueError(f"factors {sorted(given)}, the layer has {sorted(own)}")
    wrong = []
    for n, t in given.items():
        p = own[n]
        same = t.shape == p.shape or (t.numel() == p.numel() and (t.shape[0] == p.shape[0] or n == "dora_scale"))
        if not same:
            wrong.append(f"{n} {tuple(t.shape)} (needs {tuple(p.shape)})")
    if wrong:
        raise ValueError(", ".join(wrong))
    with torch.no_grad():
        for n, t in given.items():
            own[n].copy_(t.reshape(own[n].shape))


def build_layer(kind: str, module: nn.Module, entry: FileEntry, rank: int, alpha: float, **kwargs: Any) -> Adapter:
    """The adapter layer of one file entry around `module`, its factors copied in; ValueError when they do not fit."""
    f = entry.factors
    if kind == "lokr":
        layer = LoKr(module, rank, alpha, shapes={n: tuple(t.shape) for n, t in f.items()}, **kwargs)
    elif kind == "loha":
        layer = LoHa(module, rank, alpha, tucker="hada_t1" in f, **kwargs)
    else:
        options = {"tucker": "lora_mid.weight" in f}
        if kind == "dora":
            m, out = f.get("dora_scale", f.get("lora_magnitude_vector")), module.weight.shape[0]
            options["wd_on_output"] = "lora_magnitude_vector" in f or (m.shape[0] == out and m.numel() == out)
        layer = ADAPTERS[kind](module, rank, alpha, **options, **kwargs)
    copy_factors(layer, f)
    with torch.no_grad():
        shape = layer.update_weight().shape  # also checks that the factors fit each other
    if shape != layer.weight.shape:
        raise ValueError(f"the factors make a weight of shape {tuple(shape)}, "
                         f"the layer has {tuple(layer.weight.shape)}")
    return layer


def load(path: str | os.PathLike, model: Any, scale: float = 1.0, *, merge: bool = False,
         name: str | None = None, strict: bool = True, trainable: bool = False,
         dtype: torch.dtype | None = None) -> LoadedLoRA:
    """Apply a LoRA file to `model` (a UNet, a text encoder, a dict of them, or an object with .unet).

    Reads our files, sd-scripts/kohya files, LyCORIS files (LoCon with or without Tucker cores, DoRA, LoHa,
    LoKr), and diffusers/peft files (LoRA, DoRA). A module without alpha (or with alpha 0, as sd-scripts reads
    it) gets alpha = rank. merge=False adds live layers named `name` (default: the file's stem) whose
    multiplier is `scale`; several files can be loaded, each adjustable with set_multiplier(model, s, name).
    merge=True adds scale · ΔW straight into the weights instead (for DoRA: scale · (W' − W0)).
    Everything is checked before the model is touched: keys that match no module, shape mismatches
    (e.g. a LoRA for another base model) and unsupported LoRA types raise one ValueError listing them.
    strict=False skips (and reports in .skipped) keys for modules the model does not have.
    trainable=True (with e.g. dtype=torch.float32) gives layers to go on training, as inject() makes.
    """
    path = str(path)
    tensors, metadata = read_tensors(path)
    entries, problems = parse_entries(tensors)
    parts = model_parts(model)
    rs = metadata.get(SCALING_KEY) == "alpha/sqrt(r)"
    peft = peft_configs(metadata, path)
    name = name or Path(path).stem
    if not merge:
        used = {layer.name for module in parts.values() for _, layer in named_lora_layers(module)}
        if name in used:
            raise ValueError(f"the model already has a LoRA named {name!r}; pass another name=")

    lookups: dict[tuple[str, str], dict[str, str]] = {}
    for part, module in parts.items():
        namer = _namer(part, module)
        kohya, diffusers = {}, {}
        for mpath, _ in candidates(module):
            try:
                kohya[namer(mpath, "kohya")] = mpath
                diffusers[namer(mpath, "diffusers")] = mpath
            except ValueError:
                pass  # a layer outside the kohya/diffusers naming (none in SD1/SD2 models)
            if part == "unet":
                kohya.setdefault(names.kohya_ldm_name(mpath), mpath)  # sd-scripts' LDM spelling (SDXL style)
        if part in names.TEXT_PARTS:
            for hf, third in _packed_qkv(module).items():
                kohya[names.KOHYA_PREFIX[part] + hf.replace(".", "_")] = third
                diffusers[hf] = third
        lookups[(part, "kohya")], lookups[(part, "diffusers")] = kohya, diffusers

    plan: list[tuple[str, str, FileEntry, Adapter | None]] = []  # (part, module path, entry, its layer if built)
    skipped: list[str] = []
    hints: list[str] = []
    part_names = {"unet": "UNet", "te": "text encoder", "te1": "first SDXL text encoder (CLIP-L, lora_te1_)",
                  "te2": "second SDXL text encoder (OpenCLIP bigG, lora_te2_ / text_encoder_2.)"}
    for (part, fname, fmt), entry in entries.items():
        if part == "te" and "te" not in parts and "te1" in parts:
            part = "te1"  # an SDXL model: diffusers' text_encoder. (and lora_te_) is its first tower
        if part not in parts:
            what = f"keys for a {part_names[part]}, but none was given (pass {{'unet': ..., 'text_encoder': ...}})"
            (skipped if not strict else problems.setdefault(what, [])).extend(entry.keys)
            continue
        mpath = lookups[(part, fmt)].get(fname)
        if mpath is None:
            what = f"keys that match no {part_names[part]} module"
            (skipped if not strict else problems.setdefault(what, [])).extend(entry.keys)
            continue
        try:
            kind = entry_kind(entry)
        except ValueError as err:
            problems.setdefault(str(err), []).append(fname)
            continue
        if _PACKED.fullmatch(mpath) and not merge and (kind != "lora" or "lora_mid.weight" in entry.factors):
            problems.setdefault("q/k/v of an OpenCLIP text encoder (SD2, SDXL's second) are one packed tensor: live, "
                                "only plain LoRA (lora_down/lora_up) adapts them; load with merge=True",
                                []).append(fname)
            continue
        if kind != "lora" or "lora_mid.weight" in entry.factors:
            # DoRA, LoHa, LoKr, Tucker LoCon: the layer is built now (nothing in the model changes yet) and checked.
            rank = entry_rank(kind, entry)
            alpha, layer_rs = entry_alpha(entry, rank, rs, peft)
            try:
                layer = build_layer(kind, _stand_in(parts[part], mpath), entry, rank, alpha, rs=layer_rs,
                                    multiplier=scale, name=name, dtype=dtype)
            except (ValueError, RuntimeError) as err:
                problems.setdefault("shape mismatches (file factors vs what the model's layer needs)", []).append(
                    f"{fname} ({kind}): {str(err).splitlines()[0]}")
                continue
            plan.append((part, mpath, entry, layer))
            continue
        weight = _target_weight(parts[part], mpath)
        down = _as_weight_shape(entry.down, weight.ndim)
        up = _as_weight_shape(entry.up, weight.ndim)
        r = down.shape[0]
        want_down = (r, *weight.shape[1:])
        want_up = (weight.shape[0], r, *((1, 1) if weight.ndim == 4 else ()))
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            problems.setdefault("shape mismatches (file down/up vs what the model's layer needs)", []).append(
                f"{fname}: down {tuple(entry.down.shape)} up {tuple(entry.up.shape)}; "
                f"{mpath} needs down {want_down} up {want_up}")
            if mpath.endswith("attn2.to_k") and down.ndim == 2 and down.shape[1] != weight.shape[1]:
                hint = (f"the file's cross-attention context width is {down.shape[1]} but the model's is "
                        f"{weight.shape[1]} (768: SD1 CLIP-L, 1024: SD2 OpenCLIP-H, 2048: SDXL): a LoRA for another "
                        "base model")
                if hint not in hints:
                    hints.append(hint)
            continue
        entry.down, entry.up = down, up
        plan.append((part, mpath, entry, None))

    file_version = metadata.get("ss_base_model_version")
    model_version = base_model_version(model, parts)
    if problems and file_version and "unet" in parts and file_version[:5] != model_version[:5]:
        hints.append(f"the file says ss_base_model_version={file_version}; the model is {model_version}")
    if problems:
        raise ValueError(describe_problems(path, problems, hints))
    if not plan:
        raise ValueError(f"cannot load LoRA file {path}: no LoRA weights for this model in it")

    modules = []
    thirds: dict[tuple[str, str], dict[str, tuple]] = {}  # (part, attention path) -> {slice: (down, up, alpha, rs)}
    for part, mpath, entry, layer in plan:
        module = parts[part]
        if layer is not None:
            if merge:
                weight = _target_weight(module, mpath)
                with torch.no_grad():
                    weight.copy_((weight.float() + layer.delta_weight(scale)).to(weight.dtype))
            else:
                for p in layer.adapter_parameters():  # only the new tensors' flags change
                    p.requires_grad_(trainable)
                set_module(module, mpath, layer)
            modules.append(f"{part}:{mpath}" if len(parts) > 1 else mpath)
            continue
        r = entry.down.shape[0]
        alpha, layer_rs = entry_alpha(entry, r, rs, peft)
        third = _PACKED.fullmatch(mpath)
        if third and not merge:  # OpenCLIP's q/k/v: one PackedLoRA per attention, made below
            thirds.setdefault((part, third.group(1)), {})[third.group(2)] = (entry.down, entry.up, alpha, layer_rs)
        elif merge:
            weight = _target_weight(module, mpath)
            file_scale = alpha / (math.sqrt(r) if layer_rs else r)
            up, down = (t.to(weight.device, torch.float32).flatten(1) for t in (entry.up, entry.down))
            delta = (up @ down).view(weight.shape)  # on the weight's device (a GPU, or meta in sample.py's preflight)
            with torch.no_grad():
                weight.copy_((weight.float() + (scale * file_scale) * delta).to(weight.dtype))
        else:
            layer = wrap(module.get_submodule(mpath), r, alpha, rs=layer_rs, multiplier=scale, name=name,
                         dtype=dtype)
            with torch.no_grad():
                layer.lora_down.weight.copy_(entry.down)
                layer.lora_up.weight.copy_(entry.up)
            # Only the new factors' flags change; the base layer keeps whatever it had.
            layer.lora_down.weight.requires_grad_(trainable)
            layer.lora_up.weight.requires_grad_(trainable)
            set_module(module, mpath, layer)
        modules.append(f"{part}:{mpath}" if len(parts) > 1 else mpath)
    for (part, attention), slices in thirds.items():
        rules = {rule for *_, rule in slices.values()}
        if len(rules) > 1:  # thirds with different scaling rules: give each its own scale as alpha/r
            slices = {x: (d, u, a * (math.sqrt(d.shape[0]) if rule else 1.0), False)
                      for x, (d, u, a, rule) in slices.items()}
            rules = {False}
        packed.wrap_factors(parts[part].get_submodule(attention), {x: s[:3] for x, s in slices.items()},
                            rs=rules.pop(), multiplier=scale, name=name, dtype=dtype, trainable=trainable)
    if trainable and not merge:
        for module in parts.values():
            freeze_base(module)  # as inject() leaves it: only LoRA factors train
    fmt = "kohya" if any(e.fmt == "kohya" for _, _, e, _ in plan) else "diffusers"
    return LoadedLoRA(name=name, path=path, format=fmt, modules=modules, merged=merge, skipped=skipped,
                      metadata=metadata)

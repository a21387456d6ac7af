"""Weight updates ΔW layer by layer: from an adapter file or a full fine-tune (W_tuned − W_base).

A plain LoRA keeps its factors (ΔW = scale·B·A, never formed); DoRA, LoHa, LoKr and Tucker LoRA files give a dense
ΔW per layer, computed by the adapter's own layer from lora/ (update_weight: the formula that trains and merges it).
For DoRA, ΔW is the merged weight minus W0 (the magnitude included), so it needs the base.

    base = load_base("v1-5-pruned-emaonly.safetensors")
    run = load_run("runs/r8/lora_final.safetensors", base)        # or a full fine-tune's checkpoint
    for name, d in run.deltas.items(): d.matrix()                  # ΔW as an (out, in·kh·kw) float64 matrix

Layers are named by our module paths (checkpoint keys without '.weight'; text-encoder layers get 'te:'),
or, for a LoRA file read without a base, by the module names the file itself uses.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import sd
from lora import io as lora_io
from lora.inject import PRESETS, candidates, named_lora_layers, remove
from lora.io import load as load_lora
from lora.layer import LoRAConv, LoRALinear
from lora.names import DIFFUSERS_PREFIX
from sd.load import text_state_dict_preparer
from sd.model import TEXT_PREFIX, UNET_PREFIX

TE = "te:"


@dataclass
class Delta:
    """One layer's update. A LoRA keeps its factors (ΔW = scale·up@down); a full fine-tune reads W_tuned on demand;
    another adapter (DoRA, LoHa, LoKr, Tucker LoRA) computes its dense ΔW on demand with its own layer."""

    name: str
    shape: tuple[int, ...]                        # the weight's shape: (out, in) or (out, in, kh, kw)
    up: torch.Tensor | None = None                # B as a matrix (out, r)
    down: torch.Tensor | None = None              # A as a matrix (r, in·kh·kw)
    scale: float = 1.0
    tuned: Callable[[], torch.Tensor] | None = None  # full fine-tune: reads W_tuned
    base: torch.Tensor | None = None              # W0 (the base model's own tensor), when a base is known
    file_key: str | None = None                   # LoRA read without a base: the module name as the file spells it
    file_format: str | None = None                # ... and that file's layout: "kohya" or "diffusers"
    update: Callable[[], torch.Tensor] | None = None  # other adapters: ΔW shaped like the weight (float32)
    adapter: str = "lora"                         # "lora", "dora", "loha", "lokr", or "full" (a fine-tune)

    @property
    def is_lora(self) -> bool:
        return self.up is not None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def rank(self) -> int:
        """The LoRA rank r, or min(out, in·kh·kw) for a dense update."""
        return self.down.shape[0] if self.is_lora else min(self.matrix_shape)

    def matrix(self) -> torch.Tensor:
        """ΔW as an (out, in·kh·kw) float64 matrix."""
        if self.is_lora:
            return self.scale * (self.up.double() @ self.down.double())
        if self.update is not None:
            return self.update().double().flatten(1)
        if self.tuned is None or self.base is None:
            raise ValueError(f"{self.name}: no update to compute (neither LoRA factors nor a tuned weight)")
        return self.tuned().double().flatten(1) - self.base.double().flatten(1)

    def base_matrix(self) -> torch.Tensor:
        if self.base is None:
            raise ValueError(f"{self.name}: this analysis needs the base weights; pass the base checkpoint")
        return self.base.double().flatten(1)

    def tuned_matrix(self) -> torch.Tensor:
        """W0 + ΔW as an (out, in·kh·kw) float64 matrix."""
        if not self.is_lora and self.update is None and self.tuned is not None:
            return self.tuned().double().flatten(1)
        return self.base_matrix() + self.matrix()


@dataclass
class Run:
    """One fine-tuning result: a LoRA file or a full checkpoint, as per-layer updates."""

    label: str
    path: str
    kind: str                                     # "full", "lora", or the adapters in it: "loha", "dora", ...
    deltas: dict[str, Delta]
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # full fine-tunes: layers that did not change


@dataclass
class Base:
    """A base checkpoint loaded in float32 (exact for fp16/bf16 files), with its adaptable layers by name."""

    path: str
    model: Any                                    # sd.StableDiffusion
    weights: dict[str, torch.Tensor]              # layer name -> W0 (the model's own tensor)
    keys: dict[str, str]                          # layer name -> checkpoint key


# -------------------------------------------------------------------------------------------- names

def block_of(name: str) -> str:
    """The block a layer belongs to: 'input_blocks.4', 'middle_block', 'te:layers.3', 'down_blocks_1', ..."""
    te = name.startswith(TE) or name.startswith(("lora_te", "text_encoder."))
    n = name.removeprefix(TE)
    m = re.search(r"(?:layers|resblocks)[._](\d+)", n) if te else None
    if m:
        return f"te:layers.{m.group(1)}"
    if te:
        return "te:" + n.split(".")[0]
    m = (re.match(r"((?:input|output)_blocks\.\d+|middle_block)", n)
         or re.search(r"((?:down|up)_blocks[._]\d+|mid_block)", n))
    if m:
        return m.group(1)
    return n.removeprefix("lora_unet_").removeprefix("unet.").split(".")[0]


def block_key(block: str) -> tuple:
    """Sort key putting blocks in model order: time embedding, encoder, middle, decoder, output, text encoder."""
    m = re.fullmatch(r"(input_blocks|down_blocks)[._](\d+)", block)
    if m:
        return (0, 1, int(m.group(2)))
    m = re.fullmatch(r"(output_blocks|up_blocks)[._](\d+)", block)
    if m:
        return (0, 3, int(m.group(2)))
    if block in ("middle_block", "mid_block"):
        return (0, 2, 0)
    if block.startswith(("time_embed", "time_embedding")):
        return (0, 0, 0)
    m = re.fullmatch(r"te:layers\.(\d+)", block)
    if m:
        return (2, 1, int(m.group(1)))
    if block.startswith("te:"):
        return (2, 0, block)
    if block in ("out", "conv_out", "conv_norm_out"):
        return (0, 4, 0)
    return (1, 0, block)


_KIND = re.compile(r"^.*(?:transformer_blocks[._]\d+|layers[._]\d+|resblocks[._]\d+|attentions[._]\d+|resnets[._]\d+"
                   r"|downsamplers[._]\d+|upsamplers[._]\d+|(?:input|output)_blocks\.\d+\.\d+|middle_block\.\d+)[._]")


def kind_of(name: str) -> str:
    """The layer's role inside its block, the same in every block: 'attn1.to_q', 'ff.net.2', 'in_layers.2', ..."""
    return _KIND.sub("", name.removeprefix(TE))


def select(names: Iterable[str], targets: str | Sequence[str] | None) -> list[str]:
    """The names matching `targets`: a preset ('attn', 'attn-mlp', 'all'), globs, or 're:' regexes (None: all).

    Presets match module paths as lora.inject does; globs and regexes match the names shown in the tables.
    """
    names = list(names)
    if targets is None or targets == "" or targets == []:
        return names
    if isinstance(targets, str):
        targets = [targets] if targets in PRESETS else [t.strip() for t in targets.split(",") if t.strip()]
    checks: list[Callable[[str], bool]] = []
    for t in targets:
        if t in PRESETS:
            pats = [re.compile(p) for p in PRESETS[t]]
            checks.append(lambda n, pats=pats: any(p.fullmatch(n.removeprefix(TE)) for p in pats))
        elif t.startswith("re:"):
            pat = re.compile(t[3:])
            checks.append(lambda n, pat=pat: bool(pat.fullmatch(n)))
        else:
            checks.append(lambda n, t=t: fnmatch.fnmatchcase(n, t))
    return [n for n in names if any(c(n) for c in checks)]


def default_label(path: str | Path) -> str:
    """The file's stem, or its folder's name for train.py's generic 'lora_final' / 'model_final'."""
    path = Path(path)
    if re.fullmatch(r"(lora|model)_(final|step_\d+)", path.stem) and path.parent.name:
        return path.parent.name if path.stem.endswith("final") else f"{path.parent.name}/{path.stem}"
    return path.stem


def unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append(label if n == 0 else f"{label}#{n + 1}")
    return out


# ---------------------------------------------------------------------------------------- loading

def load_base(path: str | Path, text_encoder: bool = True, dtype: torch.dtype | None = None) -> Base:
    """A base checkpoint with its Linear/Conv layers (UNet, and the text encoder unless text_encoder=False).

    dtype None keeps the file's own precision (fp16 files stay fp16: exact, and half the memory of fp32);
    the analyses convert each weight to float64 when they use it.
    """
    if dtype is None:
        kinds = [t.dtype for k, t in sd.CheckpointFile(path).shapes.items()
                 if k.startswith(UNET_PREFIX) and t.is_floating_point()]
        dtype = max(set(kinds), key=kinds.count) if kinds else torch.float32
        dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    model = sd.load(path, dtype=dtype)
    weights, keys = {}, {}
    parts = [(model.unet, "", UNET_PREFIX)] + ([(model.text_encoder, TE, TEXT_PREFIX)] if text_encoder else [])
    for module, label, prefix in parts:
        for mpath, layer in candidates(module):
            weights[label + mpath] = layer.weight.detach()
            keys[label + mpath] = f"{prefix}{mpath}.weight"
    return Base(path=str(path), model=model, weights=weights, keys=keys)


def is_full_checkpoint(path: str | Path) -> bool:
    """True for an original SD checkpoint (it has UNet keys), False for anything else, e.g. a LoRA file."""
    try:
        keys = sd.CheckpointFile(path).keys()
    except ValueError:
        return False
    return any(k.startswith(UNET_PREFIX) for k in keys)


def load_run(path: str | Path, base: Base | None = None, label: str | None = None,
             targets: str | Sequence[str] | None = None, progress: bool = True) -> Run:
    """A LoRA file or a full fine-tune's checkpoint as per-layer updates.

    With a base, a LoRA is applied to it through lora.load (every format lora.load reads; a LoRA for another
    model raises its ValueError naming the mismatched layers) and layers are named by module path.
    Without a base, a LoRA is read straight from the file. A full checkpoint always needs its base.
    targets: keep only these layers (see select()).
    """
    path = str(path)
    label = label or default_label(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if is_full_checkpoint(path):
        if base is None:
            raise ValueError(f"{path} is a full checkpoint: its update is W_tuned − W_base, so pass the base "
                             f"checkpoint it was fine-tuned from (--base)")
        run = _full_run(path, base, label, targets, progress)
    elif base is None:
        deltas, metadata = read_lora_file(path)
        run = Run(label, path, adapter_kind(deltas), deltas, metadata)
    else:
        run = _lora_on_base(path, base, label)
    keep = set(select(run.deltas, targets))
    run.deltas = {n: d for n, d in run.deltas.items() if n in keep}
    if not run.deltas:
        hint = ""
        if base is None and isinstance(targets, str) and targets in PRESETS:
            hint = " (presets match module paths, and this LoRA was read without a base: pass --base, or use globs)"
        raise ValueError(f"{path}: no layers left to analyse" + (f" after targets={targets!r}" if targets else "")
                         + hint)
    return run


def load_runs(paths: list[str], base: str | None = None, labels: list[str] | None = None, layers: str | None = None,
              progress: bool = True) -> list[Run]:
    """Load several runs against one base (loaded once); labels default to the file (or run folder) names."""
    if labels and len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} runs")
    labels = unique_labels(labels or [default_label(p) for p in paths])
    base_obj = load_base(base) if base else None
    return [load_run(p, base_obj, label, targets=layers, progress=progress) for p, label in zip(paths, labels)]


def read_lora_file(path: str | Path) -> tuple[dict[str, Delta], dict[str, str]]:
    """An adapter file's updates without a model: {module name as in the file: Delta}, and the file's metadata.

    Reads what lora.load reads (kohya, LoCon, LyCORIS LoHa/LoKr/Tucker, diffusers/peft) with the same alpha rules.
    Plain LoRA layers keep their factors; LoHa, LoKr and Tucker LoRA layers are built by lora/ on a stand-in layer
    of the shape their factors imply (a kxk conv without a core keeps its kernel flat: (out, in·kh·kw)). DoRA needs
    the base weights (its ΔW depends on W0): load it with a base.
    """
    path = str(path)
    tensors, metadata = lora_io.read_tensors(path)
    entries, problems = lora_io.parse_entries(tensors)
    kinds = {}
    for key, entry in entries.items():
        try:
            kinds[key] = lora_io.entry_kind(entry)
        except ValueError as err:
            problems.setdefault(str(err), []).append(key[1])
            continue
        if kinds[key] == "dora":
            problems.setdefault("DoRA modules: W' = m·V/‖V‖ depends on W0, so pass the base checkpoint (--base)",
                                []).append(key[1])
    if problems:
        raise ValueError(lora_io.describe_problems(path, problems, []).replace("cannot load", "cannot read"))
    if not entries:
        raise ValueError(f"{path}: no LoRA weights in this file")
    rs_file = metadata.get(lora_io.SCALING_KEY) == "alpha/sqrt(r)"
    peft = lora_io.peft_configs(metadata, path)
    deltas = {}
    for (part, module, fmt), entry in entries.items():
        kind = kinds[(part, module, fmt)]
        name = module if fmt == "kohya" else DIFFUSERS_PREFIX[part] + module
        r = lora_io.entry_rank(kind, entry)
        alpha, rs = lora_io.entry_alpha(entry, r, rs_file, peft)
        if kind == "lora" and "lora_mid.weight" not in entry.factors:
            down, up = entry.down.float(), entry.up.float()
            deltas[name] = Delta(name=name, shape=(up.shape[0], *down.shape[1:]), up=up.flatten(1),
                                 down=down.flatten(1), scale=alpha / (math.sqrt(r) if rs else r), file_key=name,
                                 file_format=fmt)
            continue
        try:
            layer = lora_io.build_layer(kind, _stand_in(kind, entry.factors), entry, r, alpha, rs=rs,
                                        dtype=torch.float32)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: {module} ({kind}): the factors do not fit each other: "
                             f"{str(err).splitlines()[0]}") from None
        deltas[name] = Delta(name=name, shape=tuple(layer.weight.shape), update=partial(layer.delta_weight, 1.0),
                             adapter=kind, file_key=name, file_format=fmt)
    return deltas, metadata


def _stand_in(kind: str, f: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An empty nn.Linear / nn.Conv2d of the weight shape an adapter's factors imply (its W0 is never read)."""
    if kind == "loha":
        if "hada_t1" in f:  # Tucker: W1a (r, out), W1b (r, in), core (r, r, kh, kw)
            shape = (f["hada_w1_a"].shape[1], f["hada_w1_b"].shape[1], *f["hada_t1"].shape[2:])
        else:
            shape = (f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1])
    elif kind == "lokr":
        a, c = (f["lokr_w1"].shape if "lokr_w1" in f else (f["lokr_w1_a"].shape[0], f["lokr_w1_b"].shape[1]))
        if "lokr_w2" in f:
            b, d, *kernel = f["lokr_w2"].shape
        elif "lokr_t2" in f:
            b, d, kernel = f["lokr_w2_a"].shape[1], f["lokr_w2_b"].shape[1], list(f["lokr_t2"].shape[2:])
        else:
            b, d, kernel = f["lokr_w2_a"].shape[0], f["lokr_w2_b"].shape[1], []
        shape = (a * b, c * d, *kernel)
    else:  # LoRA with a Tucker core: down (r, in, 1, 1), lora_mid (r, r, kh, kw), up (out, r, 1, 1)
        shape = (f["lora_up.weight"].shape[0], f["lora_down.weight"].shape[1], *f["lora_mid.weight"].shape[2:])
    if len(shape) == 4:
        layer = torch.nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")
    else:
        layer = torch.nn.Linear(shape[1], shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)
    return layer


def adapter_kind(deltas: dict[str, Delta]) -> str:
    """A run's kind from its layers: 'lora', 'loha', 'lokr', 'dora', or several joined by '+'."""
    return "+".join(sorted({d.adapter for d in deltas.values()})) or "lora"


_counter = iter(range(10**9))


def _lora_on_base(path: str, base: Base, label: str) -> Run:
    """Apply the file to the base through lora.load (all its checks), read each layer's update off, take it out again.

    Plain LoRA layers give their factors; DoRA, LoHa, LoKr, Tucker and packed q/k/v layers keep the layer itself
    (taken out of the model, still on W0) to compute their dense ΔW with their own formula when asked.
    """
    name = f"_analysis_{next(_counter)}"
    parts = {"unet": base.model.unet, "text_encoder": base.model.text_encoder}
    try:
        loaded = load_lora(path, parts, name=name, dtype=torch.float32)  # factors exact whatever the base's dtype
    except ValueError as err:
        raise ValueError(f"{path} does not fit the base model {base.path}:\n{err}") from None
    deltas = {}
    try:
        for part, prefix in (("unet", ""), ("text_encoder", TE)):
            for mpath, layer in named_lora_layers(parts[part], name):
                n = prefix + mpath
                if type(layer) in (LoRALinear, LoRAConv) and getattr(layer, "lora_mid", None) is None:
                    deltas[n] = Delta(name=n, shape=tuple(layer.weight.shape),
                                      up=layer.lora_up.weight.detach().float().flatten(1).clone(),
                                      down=layer.lora_down.weight.detach().float().flatten(1).clone(),
                                      scale=layer.multiplier * layer.scale, base=layer.weight.detach())
                else:
                    deltas[n] = Delta(name=n, shape=tuple(layer.weight.shape), update=layer.delta_weight,
                                      adapter=layer.kind, base=layer.weight.detach())
    finally:
        for module in parts.values():
            remove(module, name)
    return Run(label, path, adapter_kind(deltas), deltas, loaded.metadata)


def _full_run(path: str, base: Base, label: str, targets: str | Sequence[str] | None, progress: bool) -> Run:
    """W_tuned − W_base for every layer the tuned file changed; the two files must have the same layers."""
    ckpt = sd.CheckpointFile(path)
    # Text-encoder keys of old-layout SD1 files lack 'text_model.': find each layer's key as this file spells it.
    prepare = text_state_dict_preparer(base.model.version)
    file_keys = {k: k for k in ckpt.shapes}
    for k, t in ckpt.shapes.items():
        if k.startswith(TEXT_PREFIX):
            for new in prepare({k[len(TEXT_PREFIX):]: t}):
                file_keys[TEXT_PREFIX + new] = k
    missing, wrong, deltas = [], [], {}
    for n in select(base.weights, targets):
        w0, key = base.weights[n], base.keys[n]
        fkey = file_keys.get(key)
        if fkey is None:
            missing.append(key)
        elif tuple(ckpt.shapes[fkey].shape) != tuple(w0.shape):
            wrong.append(f"{key}: tuned {tuple(ckpt.shapes[fkey].shape)} vs base {tuple(w0.shape)}")
        else:
            deltas[n] = Delta(name=n, shape=tuple(w0.shape), tuned=partial(ckpt.read, fkey, torch.float32), base=w0,
                              adapter="full")
    if missing or wrong:
        lines = [f"{path} and the base {base.path} are not the same model architecture:"]
        for what, items in (("layers the tuned file lacks", missing), ("shape mismatches", wrong)):
            if items:
                lines.append(f"  - {what} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("\n".join(lines))
    changed, same = {}, []
    for n, d in tqdm(deltas.items(), desc=f"{label}: changed layers", unit="layer", disable=not progress, leave=False):
        (same.append(n) if torch.equal(d.tuned(), d.base.float()) else changed.__setitem__(n, d))
    if not changed:
        raise ValueError(f"{path}: no layer differs from the base {base.path} (is it the base itself?)")
    return Run(label, path, "full", changed, dict(ckpt.metadata), skipped=same)


def common_layers(runs: Sequence[Run], strict: bool = True) -> list[str]:
    """Layer names present in every run, in the first run's order; strict=True makes differing sets an error."""
    first = list(runs[0].deltas)
    shared = [n for n in first if all(n in r.deltas for r in runs[1:])]
    if strict:
        for r in runs[1:]:
            only_a = [n for n in first if n not in r.deltas]
            only_b = [n for n in r.deltas if n not in runs[0].deltas]
            if only_a or only_b:
                lines = [f"{runs[0].label} and {r.label} do not adapt the same layers:"]
                if only_a:
                    lines.append(f"  only in {runs[0].label} ({len(only_a)}): " + ", ".join(only_a[:6]) +
                                 (" ..." if len(only_a) > 6 else ""))
                if only_b:
                    lines.append(f"  only in {r.label} ({len(only_b)}): " + ", ".join(only_b[:6]) +
                                 (" ..." if len(only_b) > 6 else ""))
                lines.append("  hint: --common compares the layers they share; with --base, layers are matched by "
                             "module path whatever each file's naming")
                raise ValueError("\n".join(lines))
    if not shared:
        raise ValueError(f"the runs {[r.label for r in runs]} share no layer"
                         + ("" if all(r.deltas and next(iter(r.deltas.values())).base is not None for r in runs)
                            else " (files with different naming: pass --base to match layers by module path)"))
    return shared

"""Put adapter layers (LoRA, DoRA, LoHa, LoKr) into a model in place by module path, take them out, merge them, and
count what they train."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from . import dora, loha, lokr, packed
from .base import Adapter
from .layer import wrap as wrap_lora

# The adapter family: inject(adapter=...) -> the function that wraps one layer (each in its own file).
ADAPTERS = {"lora": wrap_lora, "dora": dora.wrap, "loha": loha.wrap, "lokr": lokr.wrap}
# Each one's own options, besides rank, alpha, rs, dropout, init, name and dtype.
ADAPTER_OPTIONS = {"lora": ("tucker",), "dora": ("tucker", "wd_on_output"), "loha": ("tucker",),
                   "lokr": ("factor", "decompose_both", "full_matrix", "tucker")}

# Presets as regexes on full module paths, covering our UNet (LDM names) and the CLIP text encoders.
_ATTN_UNET = r".*\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_MLP_UNET = r".*\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
_RES_UNET = (r"(input_blocks|middle_block|output_blocks)\.\d+\.(\d+\.)?"
             r"(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)")
# CLIP-L (transformers names) and OpenCLIP (open_clip names): its q/k/v are the thirds of one packed weight, adapted
# by a PackedLoRA on the attention module itself (lora/packed.py; plain LoRA without dropout or PiSSA only: with
# other settings a preset leaves them out), and its out_proj.
_ATTN_TE = r"(.*\.)?(self_attn\.(q_proj|k_proj|v_proj|out_proj)|resblocks\.\d+\.attn(\.out_proj)?)"
_MLP_TE = r"(.*\.)?(mlp\.(fc1|fc2)|resblocks\.\d+\.mlp\.(c_fc|c_proj))"

PRESETS: dict[str, list[str]] = {
    # diffusers' default: the four attention projections.
    "attn": [_ATTN_UNET, _ATTN_TE],
    # sd-scripts' default: every Linear/1x1 conv inside a transformer, and CLIP's attention + MLP.
    "attn-mlp": [_ATTN_UNET, _MLP_UNET, _ATTN_TE, _MLP_TE],
    # LoCon: also the ResBlock convs, their time-embedding projections, and the down/upsampler convs.
    "all": [_ATTN_UNET, _MLP_UNET, _RES_UNET, _ATTN_TE, _MLP_TE],
}

Pattern = str | re.Pattern


def _compile(pattern: Pattern) -> re.Pattern:
    """'re:...' or a compiled pattern is a regex; any other string is a glob. Both must match the whole path."""
    if isinstance(pattern, re.Pattern):
        return pattern
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


def _patterns(targets: str | Iterable[Pattern]) -> list[re.Pattern]:
    if isinstance(targets, str):
        if targets in PRESETS:
            return [re.compile(p) for p in PRESETS[targets]]
        targets = [targets]
    return [_compile(t) for t in targets]


def first_match(path: str, table: Mapping[Pattern, float] | None) -> float | None:
    """The value of the first pattern in `table` (glob or re:) that matches the whole module path, or None."""
    for pattern, value in (table or {}).items():
        if _compile(pattern).fullmatch(path):
            return value
    return None


def candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every layer an adapter can wrap: Linear, Conv2d, and adapters (to stack on).

    The insides of adapters (their base and factors) are not candidates themselves.
    """
    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, (nn.Linear, nn.Conv2d, Adapter)):
                yield path, child
            if not isinstance(child, Adapter):
                yield from walk(child, path + ".")
    yield from walk(model, "")


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (dotted, as named_modules gives it) inside `model`, in place of what is there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _kernel(module: nn.Module) -> tuple[int, ...]:
    base = module.base_layer if isinstance(module, Adapter) else module
    return tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()


def inject(model_part: nn.Module, rank: int = 4, alpha: float | None = None,
           targets: str | Iterable[Pattern] = "attn", *, adapter: str = "lora",
           rank_overrides: Mapping[Pattern, int] | None = None,
           alpha_overrides: Mapping[Pattern, float] | None = None,
           conv_rank: int | None = None, conv_alpha: float | None = None,
           init: str = "kaiming", rs: bool = False, dropout: float = 0.0, name: str = "default",
           dtype: torch.dtype | None = None, **adapter_options: Any) -> list[str]:
    """Wrap the target layers of `model_part` in adapter layers, in place; return the wrapped module paths.

    adapter: "lora" (B·A), "dora" (magnitude and direction), "loha" (Hadamard product), "lokr" (Kronecker product);
    adapter_options: that adapter's own (ADAPTER_OPTIONS): tucker=True (kxk convs keep their kernel in a small core:
    lora_mid, hada_t1/hada_t2, lokr_t2), wd_on_output (DoRA's norm axis), factor, decompose_both, full_matrix (LoKr).
    targets: a preset ("attn", "attn-mlp", "all") or a list of patterns on module paths (glob, or
    regex with a 're:' prefix), e.g. ["*.attn2.to_k", "re:.*attn1\\.to_(q|v)"].
    rank_overrides / alpha_overrides: {pattern: value}; the first matching pattern wins; rank 0 skips a layer.
    conv_rank / conv_alpha: rank and alpha for convs with a kernel larger than 1x1 (default: rank, alpha).
    OpenCLIP's attention ('...resblocks.N.attn', in the presets) gets a PackedLoRA on its packed q/k/v (lora/packed.py).
    alpha None (or 0) means alpha = rank. Every non-adapter parameter of `model_part` is frozen afterwards;
    the new adapter tensors train (earlier adapters keep their requires_grad).
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {', '.join(ADAPTERS)}")
    unknown = sorted(set(adapter_options) - set(ADAPTER_OPTIONS[adapter]))
    if unknown:
        raise TypeError(f"{adapter} takes no option {', '.join(unknown)}; its options: "
                        f"{', '.join(ADAPTER_OPTIONS[adapter])}")
    patterns = _patterns(targets)
    chosen = [(p, m) for p, m in candidates(model_part) if any(pat.fullmatch(p) for pat in patterns)]
    chosen_packed = [(p, m) for p, m in packed.targets(model_part) if any(pat.fullmatch(p) for pat in patterns)]
    if chosen_packed and (adapter != "lora" or dropout or init not in packed.INITS):
        if not (isinstance(targets, str) and targets in PRESETS):
            raise ValueError(f"{chosen_packed[0][0]} (packed q/k/v) takes plain LoRA with init "
                             f"{' or '.join(packed.INITS)} and no dropout, not adapter={adapter!r}, init={init!r}, "
                             f"dropout={dropout:g}; leave it out of targets")
        chosen_packed = []
    if not chosen and not chosen_packed:
        raise ValueError(f"no Linear/Conv2d module matches targets {targets!r}; "
                         f"first candidate paths: {[p for p, _ in list(candidates(model_part))[:8]]}")
    injected, new_layers = [], []
    for path, module in chosen:
        big_kernel = any(k > 1 for k in _kernel(module))
        r = conv_rank if big_kernel and conv_rank is not None else rank
        a = conv_alpha if big_kernel and conv_alpha is not None else alpha
        override = first_match(path, rank_overrides)
        r = int(override) if override is not None else r
        override = first_match(path, alpha_overrides)
        a = override if override is not None else a
        if r == 0:
            continue
        new = ADAPTERS[adapter](module, r, a, rs=rs, dropout=dropout, init=init, name=name, dtype=dtype,
                                **adapter_options)
        set_module(model_part, path, new)
        injected.append(path)
        new_layers.append(new)
    for path, attention in chosen_packed:  # one PackedLoRA per attention, for its q, k and v thirds
        override = first_match(path, rank_overrides)
        r = int(override) if override is not None else rank
        if r == 0:
            continue
        override = first_match(path, alpha_overrides)
        a = override if override is not None else alpha
        new_layers.append(packed.wrap(attention, r, a, rs=rs, init=init, name=name, dtype=dtype))
        injected.append(path)
    freeze_base(model_part)
    for new in new_layers:
        for p in new.adapter_parameters():
            p.requires_grad_(True)
    return injected


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter that is not an adapter's own."""
    lora_ids = {id(p) for layer in lora_layers(model) for p in layer.adapter_parameters()}
    for p in model.parameters():
        if id(p) not in lora_ids:
            p.requires_grad_(False)


def lora_layers(model: nn.Module, name: str | None = None) -> list[Adapter | packed.PackedLoRA]:
    """Every adapter layer in `model` (stacked ones and packed q/k/v ones included), or only those of adapter `name`."""
    return [m for m in model.modules()
            if isinstance(m, (Adapter, packed.PackedLoRA)) and (name is None or m.name == name)]


def named_lora_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, Adapter | packed.PackedLoRA]]:
    """(path, layer) where path is the wrapped module's own path; a stacked layer reports the same path. A packed
    q/k/v layer reports its attention's path ('...resblocks.N.attn')."""
    out = []
    for path, module in candidates(model):
        layer = module
        while isinstance(layer, Adapter):
            if name is None or layer.name == name:
                out.append((path, layer))
            layer = layer.base
    return out + packed.named_layers(model, name)


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The adapters' own parameters: A and B for LoRA, and m for DoRA, the hada_/lokr_ factors (for an optimizer)."""
    return [p for layer in lora_layers(model, name) for p in layer.adapter_parameters()]


def set_multiplier(model: nn.Module, multiplier: float, name: str | None = None) -> None:
    """Scale the live update of every LoRA (or of adapter `name`) by `multiplier`; 0 switches it off."""
    layers = lora_layers(model, name)
    if not layers:
        raise ValueError(f"no LoRA layers{'' if name is None else f' named {name!r}'} in the model")
    merged = [layer for layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{len(merged)} LoRA layers are merged; unmerge() before changing the multiplier")
    for layer in layers:
        layer.multiplier = float(multiplier)


def _chain(module: nn.Module) -> tuple[list[Adapter], nn.Module]:
    """The adapters stacked at one path, top first, and the plain layer under them."""
    chain = []
    while isinstance(module, Adapter):
        chain.append(module)
        module = module.base
    return chain, module


@torch.no_grad()
def _restack(chain: list[Adapter], merged: list[Adapter]) -> None:
    """Leave exactly the layers `merged` of one stack merged, merged bottom first: a DoRA takes the weight of what it
    wraps, so each merge must find the layers below it in the weight and none above. From the lowest layer whose
    state changes, the merged ones are taken out (the last merged first) and the wanted ones merged upwards."""
    order = list(reversed(chain))  # bottom first
    want = [any(layer is m for m in merged) for layer in order]
    first = next((i for i, layer in enumerate(order) if layer.merged != want[i]), None)
    if first is None:
        return
    for layer in sorted((lay for lay in order[first:] if lay.merged), key=lambda lay: -lay.merge_tick):
        layer.unmerge()
    for layer, wanted in zip(order[first:], want[first:]):
        if wanted:
            layer.merge()


def _stacks(model: nn.Module) -> list[list[Adapter]]:
    return [_chain(module)[0] for _, module in candidates(model) if isinstance(module, Adapter)]


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold every adapter (or adapter `name`) into its base weight; the model then runs at base speed. In a stack
    the layers merge bottom first, so that a merged stack computes what the live one does."""
    for chain in _stacks(model):
        _restack(chain, [lay for lay in chain if lay.merged or name is None or lay.name == name])
    for layer in lora_layers(model, name):
        if not isinstance(layer, Adapter):
            layer.merge()  # packed q/k/v: plain additions


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Take merged updates back out of the weights (of every adapter, or of adapter `name`); exact, in any order."""
    for chain in _stacks(model):
        _restack(chain, [lay for lay in chain if lay.merged and name is not None and lay.name != name])
    for layer in sorted(lora_layers(model, name), key=lambda lay: -lay.merge_tick):
        if not isinstance(layer, Adapter):
            layer.unmerge()


def remove(model: nn.Module, name: str | None = None, *, merge: bool = False) -> list[str]:
    """Take adapter layers out again (all, or adapter `name`), putting the wrapped layer back; return their paths.

    merge=True keeps each update folded into the weights (a plain fine-tuned model); otherwise the
    weights go back to the base model's: merged updates are subtracted and PiSSA residuals restored.
    """
    removed = []
    for path, module in list(candidates(model)):
        chain, bottom = _chain(module)
        going = [layer for layer in chain if name is None or layer.name == name]
        if not going:
            continue
        survivors = [layer for layer in chain if all(layer is not g for g in going)]
        with torch.no_grad():
            # Undo every merge into this weight (the last first, so each layer unmerges from what it merged into);
            # with merge=True the leaving layers go into the weight, bottom first; the survivors' merges are redone.
            was_merged = [layer for layer in chain if layer.merged]
            _restack(chain, [])
            for layer in reversed(going):
                if merge:
                    layer.merge()
                if layer.pissa:
                    w = bottom.weight
                    # merged: W_res + s·B·A becomes W0 + s·(B·A - B0·A0); unmerged: W_res back to W0.
                    w.copy_((w.float() + layer.pissa_offset()).to(w.dtype))
            kept = [lay for lay in was_merged if any(lay is s for s in survivors)]
            _restack(chain, (going if merge else []) + kept)
        removed.append(path)
        # Rebuild the stack from the bottom with only the layers that stay.
        top = bottom
        for layer in reversed(survivors):
            layer.base = top
            top = layer
        if top is not module:
            set_module(model, path, top)
    removed += packed.remove(model, name, merge=merge)
    return sorted(set(removed))


def base_state_dict(model: nn.Module, *, merged: bool = False) -> dict[str, torch.Tensor]:
    """The state dict under the ORIGINAL keys, without adapter tensors, as an original checkpoint has them.

    merged=False: the base model's weights (merged updates subtracted, PiSSA residuals restored).
    merged=True: weights with every adapter folded in at its current multiplier, i.e. what the model computes.
    Does not change the model.
    """
    out: dict[str, torch.Tensor] = {}
    lora_paths = {}
    for path, module in candidates(model):
        if isinstance(module, Adapter):
            lora_paths[path] = module
    for key, value in model.state_dict().items():
        owner = next((p for p in lora_paths if key.startswith(p + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1:]
        parts = rest.split(".")
        if parts[-1] not in ("weight", "bias") or any(p != "base" for p in parts[:-1]):
            continue  # the factors / pissa buffers of some adapter in the stack
        out[f"{owner}.{parts[-1]}"] = value
    for path, top in lora_paths.items():
        chain, layer = _chain(top)
        w = layer.weight.detach().float()
        if merged:  # what the model computes: the weight as it is, plus each live update (each made from that weight)
            for lay in chain:
                if not lay.merged:
                    w = w + lay.delta_weight()
        else:
            for lay in sorted((lay for lay in chain if lay.merged), key=lambda lay: -lay.merge_tick):
                w = lay.unmerged_weight(w)
            for lay in chain:
                if lay.pissa:  # W_res + s·B0·A0 = W0
                    w = w + lay.pissa_offset()
        out[f"{path}.weight"] = w.to(layer.weight.dtype)
    return packed.original_keys(model, out, merged=merged)  # packed q/k/v: attn.in_proj_weight under its own key


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """A whole model's weights under its checkpoint keys, every LoRA folded in at its current multiplier: what the
    model computes, e.g. for `model.save(path, tensors=lora.merged_state_dict(model))`. `model` is anything with
    `.parts`, {checkpoint prefix: module} (a StableDiffusion). Does not change the model."""
    return {prefix + k: v for prefix, module in model.parts.items()
            for k, v in base_state_dict(module, merged=True).items()}


def report(model: nn.Module, name: str | None = None) -> str:
    """A table of adapter parameters per block: frozen d·k of the wrapped layers vs the adapters' trainable tensors
    (r·(d+k) for LoRA; also m for DoRA, 2r·(d+k) for LoHa, W1 and W2 for LoKr), with a total per adapter kind."""
    rows: dict[str, list[int]] = {}
    kinds: dict[str, int] = {}
    plain_lora = True
    for path, layer in named_lora_layers(model, name):
        m = re.match(r"(.*?\.\d+)(\.|$)", path)
        block = m.group(1) if m else path.split(".")[0]
        dk = layer.weight.numel()
        own = sum(p.numel() for p in layer.adapter_parameters())
        kinds[layer.kind] = kinds.get(layer.kind, 0) + own
        plain_lora &= layer.kind == "lora" and getattr(layer, "lora_mid", None) is None
        row = rows.setdefault(block, [0, 0, 0])
        row[0] += 1
        row[1] += dk
        row[2] += own
    if not rows:
        return "no adapter layers"
    label = "r*(d+k) (LoRA)" if plain_lora else "trainable (" + "+".join(kinds) + ")"
    width = max(len("block"), *(len(b) for b in rows))
    lines = [f"{'block':<{width}}  {'layers':>6}  {'d*k (frozen)':>14}  {label:>15}  {'ratio':>7}"]
    total = [0, 0, 0]
    for block, (n, dk, rdk) in rows.items():
        lines.append(f"{block:<{width}}  {n:>6}  {dk:>14,}  {rdk:>15,}  {rdk / dk:>7.2%}")
        total = [total[0] + n, total[1] + dk, total[2] + rdk]
    lines.append(f"{'total':<{width}}  {total[0]:>6}  {total[1]:>14,}  {total[2]:>15,}  {total[2] / total[1]:>7.2%}")
    if len(kinds) > 1:
        lines.append("by adapter: " + ", ".join(f"{kind} {count:,}" for kind, count in kinds.items()))
    all_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"trainable {trainable:,} of {all_params:,} parameters in the model ({trainable / all_params:.3%})")
    return "\n".join(lines)

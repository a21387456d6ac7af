"""LoRA on packed q/k/v: OpenCLIP's attention keeps q, k and v as the row thirds of one (3w, w) weight, in_proj_weight.

SD2's text encoder and SDXL's second one (OpenCLIP ViT-H, ViT-bigG) project q, k and v with that one matrix, while
LoRA files (sd-scripts, diffusers, peft) name three layers, `self_attn.q_proj`, `k_proj` and `v_proj`: each is a LoRA
for one third of the rows. One PackedLoRA holds the three and changes the packed weight as

    in_proj_weight = W0 + multiplier · [ s_q·B_q·A_q ]      rows 0 .. w-1:   q
                                       [ s_k·B_k·A_k ]      rows w .. 2w-1:  k
                                       [ s_v·B_v·A_v ]      rows 2w .. 3w-1: v

with A = lora_down (r×w), B = lora_up (w×r) and s = alpha/r (alpha/sqrt(r) for rsLoRA) per slice, and zero rows
for a slice it does not adapt. The layer is a PyTorch parametrization of the attention's `in_proj_weight`
(torch.nn.utils.parametrize): reading `attn.in_proj_weight` gives W0 plus the update, so the attention code in
text/open_clip.py runs as it is, and no other module moves (`attn.out_proj` keeps its path, and its own LoRA if it
has one). PyTorch keeps W0 at `attn.parametrizations.in_proj_weight.original`; lora.base_state_dict() gives it back
under `attn.in_proj_weight`. Several layers on one attention form a chain, each adding its own update (stacking).

The update is applied as a weight, so there is no branch input for dropout, and PiSSA's start is not built here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import Mergeable

WEIGHT = "in_proj_weight"
SLICES = ("q", "k", "v")  # the order of the row thirds, as nn.MultiheadAttention and OpenCLIP pack them
INITS = ("kaiming", "gaussian")

def is_packed(module: nn.Module) -> bool:
    """An attention whose q, k, v projections are the row thirds of one square-stacked `in_proj_weight` (3w, w)."""
    if parametrize.is_parametrized(module, WEIGHT):
        return True
    w = dict(module.named_parameters(recurse=False)).get(WEIGHT)
    return w is not None and w.ndim == 2 and w.shape[0] == 3 * w.shape[1]


def base_weight(attention: nn.Module) -> nn.Parameter:
    """The stored packed weight W0 (with any merged updates in it), not what a read of attn.in_proj_weight computes."""
    if parametrize.is_parametrized(attention, WEIGHT):
        return attention.parametrizations[WEIGHT].original
    return attention.in_proj_weight


def targets(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, attention) for every packed attention in `model`."""
    for path, module in model.named_modules():
        if is_packed(module):
            yield path, module


def layers(attention: nn.Module) -> list[PackedLoRA]:
    """The PackedLoRA layers on one attention, first applied first."""
    if not parametrize.is_parametrized(attention, WEIGHT):
        return []
    return [m for m in attention.parametrizations[WEIGHT] if isinstance(m, PackedLoRA)]


def named_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, PackedLoRA]]:
    """(attention path, layer), the last stacked first (as named_lora_layers reports stacks); `name`'s only if given."""
    return [(path, layer) for path, attn in targets(model) for layer in reversed(layers(attn))
            if name is None or layer.name == name]


class PackedLoRA(Mergeable, nn.Module):
    """W0 -> W0 + multiplier · cat(s_x·B_x·A_x for x in q, k, v): a LoRA for each third of a packed q/k/v weight.

    ranks, alphas: per slice, e.g. {"q": 4, "k": 4, "v": 4}; a slice left out is not adapted. alpha None (or 0, as
    sd-scripts reads it) means alpha = rank. Create with wrap(), which registers it on the attention.
    """

    kind = "lora"

    def __init__(self, attention: nn.Module, ranks: Mapping[str, int], alphas: Mapping[str, float | None], *,
                 rs: bool = False, init: str = "kaiming", multiplier: float = 1.0, name: str = "default",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        unknown = set(ranks) - set(SLICES)
        if not ranks or unknown:
            raise ValueError(f"packed LoRA slices must be some of {SLICES}, got {sorted(ranks)}")
        if any(r < 1 for r in ranks.values()):
            raise ValueError(f"LoRA rank must be >= 1, got {dict(ranks)}")
        w0 = base_weight(attention)
        self.rows, self.width = w0.shape[0] // 3, w0.shape[1]
        kw = dict(device=w0.device, dtype=dtype or w0.dtype)
        order = [x for x in SLICES if x in ranks]
        self.lora_down = nn.ParameterDict({x: nn.Parameter(torch.empty(ranks[x], self.width, **kw)) for x in order})
        self.lora_up = nn.ParameterDict({x: nn.Parameter(torch.empty(self.rows, ranks[x], **kw)) for x in order})
        self.alpha = {x: float(alphas.get(x) or ranks[x]) for x in order}
        self.rs = bool(rs)
        self.multiplier = float(multiplier)
        self.name = name
        self.reset_merge_state()
        self.pissa = False
        # A plain reference, not a submodule: the attention owns this layer (in its parametrizations), and merging
        # writes into the attention's stored W0.
        object.__setattr__(self, "attention", attention)
        self.reset_lora(init)

    # -- sizes and scales ----------------------------------------------------------------------------
    @property
    def slices(self) -> list[str]:
        return list(self.lora_down)

    @property
    def ranks(self) -> dict[str, int]:
        return {x: a.shape[0] for x, a in self.lora_down.items()}

    @property
    def rank(self) -> int:
        """The first slice's rank (the three share one unless a file says otherwise)."""
        return self.ranks[self.slices[0]]

    @property
    def scale(self) -> float:
        """The first slice's scale (the three share one unless a file says otherwise)."""
        return self.scales[self.slices[0]]

    @property
    def scales(self) -> dict[str, float]:
        """s = alpha/r per slice, or alpha/sqrt(r) for rsLoRA."""
        return {x: self.alpha[x] / (math.sqrt(r) if self.rs else r) for x, r in self.ranks.items()}

    @property
    def weight(self) -> nn.Parameter:
        """The attention's stored packed weight W0 (3w, w)."""
        return base_weight(self.attention)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    # -- the update as a weight -----------------------------------------------------------------------
    def update_weight(self) -> torch.Tensor:
        """cat(s_x·B_x·A_x) over q, k, v, shaped like W0, in the factors' dtype, differentiable in the factors."""
        scales = self.scales
        rows = [scales[x] * (self.lora_up[x] @ self.lora_down[x]) if x in self.lora_down
                else self.lora_up[self.slices[0]].new_zeros(self.rows, self.width) for x in SLICES]
        return torch.cat(rows)

    def lora_weight(self) -> torch.Tensor:
        """multiplier · ΔW, float32 (as LoRA layers' lora_weight() with no arguments)."""
        return self.delta_weight()

    # -- the parametrization: what a read of attn.in_proj_weight returns -------------------------------------
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.merged or self.multiplier == 0.0:
            return w
        return w + (self.multiplier * self.update_weight()).to(w.dtype)

    # -- init ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora(self, init: str = "kaiming") -> None:
        """A as nn.Linear's default init ("kaiming") or N(0, 1/r) ("gaussian"), B = 0: the update starts at zero."""
        if init not in INITS:
            raise ValueError(f"LoRA on packed q/k/v takes init {' or '.join(INITS)}, got {init!r}")
        for x in self.slices:
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_down[x], a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_down[x], std=1.0 / self.ranks[x])
            nn.init.zeros_(self.lora_up[x])

    def extra_repr(self) -> str:
        rule = "alpha/sqrt(r)" if self.rs else "alpha/r"
        each = ", ".join(f"{x}: rank {r}, alpha {self.alpha[x]:g}" for x, r in self.ranks.items())
        return (f"name={self.name!r}, {each}, scale {rule}, multiplier={self.multiplier:g}, merged={self.merged}, "
                f"rows={self.rows}")


def wrap(attention: nn.Module, rank: int | Mapping[str, int], alpha: float | None | Mapping[str, float | None] = None,
         *, rs: bool = False, dropout: float = 0.0, init: str = "kaiming", multiplier: float = 1.0,
         name: str = "default", dtype: torch.dtype | None = None) -> PackedLoRA:
    """Put a PackedLoRA on `attention`'s in_proj_weight (on top of any there) and return it.

    rank, alpha: one value for q, k and v, or {slice: value} for some of them (as a file may give).
    """
    if not is_packed(attention):
        raise TypeError(f"{type(attention).__name__} has no packed (3w, w) {WEIGHT}")
    if dropout:
        raise ValueError("LoRA on packed q/k/v adds its update to the weight, so there is no branch input to drop "
                         "out: use dropout=0 for it")
    ranks = dict(rank) if isinstance(rank, Mapping) else dict.fromkeys(SLICES, int(rank))
    alphas = dict(alpha) if isinstance(alpha, Mapping) else dict.fromkeys(ranks, alpha)
    layer = PackedLoRA(attention, ranks, alphas, rs=rs, init=init, multiplier=multiplier, name=name, dtype=dtype)
    parametrize.register_parametrization(attention, WEIGHT, layer)
    return layer


def wrap_factors(attention: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], *,
                 rs: bool = False, multiplier: float = 1.0, name: str = "default", dtype: torch.dtype | None = None,
                 trainable: bool = False) -> PackedLoRA:
    """A PackedLoRA on `attention` with given factors, {slice: (down (r×w), up (w×r), alpha)} as a file holds them."""
    layer = wrap(attention, {x: down.shape[0] for x, (down, _, _) in factors.items()},
                 {x: alpha for x, (_, _, alpha) in factors.items()}, rs=rs, multiplier=multiplier, name=name,
                 dtype=dtype)
    with torch.no_grad():
        for x, (down, up, _) in factors.items():
            layer.lora_down[x].copy_(down)
            layer.lora_up[x].copy_(up)
    for p in layer.adapter_parameters():
        p.requires_grad_(trainable)
    return layer


def file_factors(layer: PackedLoRA) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{slice: (down, up, alpha)} for a file, alpha written so that alpha / rank is the slice's scale (every reader's
    rule), as the other LoRA layers are written."""
    scales = layer.scales
    return {x: (layer.lora_down[x].detach(), layer.lora_up[x].detach(), scales[x] * r) for x, r in layer.ranks.items()}


def remove(model: nn.Module, name: str | None = None, *, merge: bool = False) -> list[str]:
    """Take PackedLoRA layers off again (all, or adapter `name`'s); return the attentions' paths.

    merge=True leaves each update added into W0; otherwise W0 goes back to what it was (merged updates subtracted).
    The layers that stay are put back on in their order; with none left, in_proj_weight is a plain parameter again.
    """
    removed = []
    for path, attention in list(targets(model)):
        chain = layers(attention)
        going = [layer for layer in chain if name is None or layer.name == name]
        if not going:
            continue
        for layer in going:
            if merge:
                layer.merge()
            else:
                layer.unmerge()
        parametrize.remove_parametrizations(attention, WEIGHT, leave_parametrized=False)  # W0 back, same Parameter
        for layer in chain:
            if all(layer is not g for g in going):
                parametrize.register_parametrization(attention, WEIGHT, layer)
        removed.append(path)
    return removed


def original_keys(model: nn.Module, state: Mapping[str, torch.Tensor], *, merged: bool) -> dict[str, torch.Tensor]:
    """`state` (keys as model.state_dict() gives them) with each adapted attention's weight back under its own key.

    '<attn>.parametrizations.in_proj_weight.original' becomes '<attn>.in_proj_weight' and the layers' factors go.
    merged=False: W0 (merged updates taken out); merged=True: W0 plus every update at its multiplier, what the model
    computes.
    """
    replace: dict[str, tuple[str, torch.Tensor]] = {}
    drop: list[str] = []
    for path, attention in targets(model):
        chain = layers(attention)
        if not chain:
            continue
        prefix = f"{path}." if path else ""
        stored = base_weight(attention)
        w = stored.detach().float()
        for layer in chain:
            if merged and not layer.merged:
                w = w + layer.delta_weight()
            elif not merged and layer.merged:
                w = w - layer.delta_weight(layer.merged_multiplier)
        own = f"{prefix}parametrizations.{WEIGHT}."
        replace[own + "original"] = (prefix + WEIGHT, w.to(stored.dtype))
        drop.append(own)
    out = {}
    for key, value in state.items():
        if key in replace:
            out[replace[key][0]] = replace[key][1]
        elif not any(key.startswith(d) for d in drop):
            out[key] = value
    return out

"""What every adapter shares: a frozen layer W0 wrapped with a trainable update ΔW, its scale, multiplier and merging.

An adapter (LoRA, DoRA, LoHa, LoKr: one file each) says what its update is, as a weight shaped like W0
(`update_weight`); this base turns that into a forward, a merge that folds it into W0, and an exact unmerge.
Adapters stack: the wrapped layer may itself be an adapter. Most updates do not depend on W0 and simply add up;
DoRA's does, and it takes the weight of the layer it wraps as that layer computes it (W0 plus the updates below it,
merged or live), as ComfyUI applies patches one after another. lora.merge / lora.unmerge on a model keep a stack's
merges in that order (bottom first), so a merged stack computes what the live one does.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

# Merges are numbered so that unmerging can go in the reverse order: DoRA's merge is not a plain addition, so
# merge(a), merge(b), unmerge(a) would not give back the weight that a saw.
_merge_clock = itertools.count()


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_pq core[p,q,h,w]·a[p,o]·b[q,i] -> (o, i, h, w): the Tucker-2 product of LyCORIS's conv cores."""
    return torch.einsum("pqhw,po,qi->oihw", core, a, b)


def autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class Mergeable:
    """Folding an update into the stored weight and taking it back out: what Adapter and lora.packed's PackedLoRA
    share. The class has `weight` (the stored W0), `multiplier` and `update_weight()` (s·ΔW shaped like W0)."""

    def reset_merge_state(self) -> None:
        self.merged = False
        self.merged_multiplier = 0.0  # the multiplier at merge time, so unmerge removes exactly what was added
        self.merge_tick = -1

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """What this layer adds to the weight it wraps at `multiplier` (default: its own), float32, no gradient."""
        m = self.multiplier if multiplier is None else multiplier
        with torch.no_grad():
            return m * self.update_weight().float()

    def merged_weight(self, w: torch.Tensor, multiplier: float) -> torch.Tensor:
        """The weight after merging into `w` (float32) at `multiplier`: w + multiplier·s·ΔW."""
        return w + self.delta_weight(multiplier)

    def unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The inverse of merged_weight, for the merge this layer made (float32)."""
        return w - self.delta_weight(self.merged_multiplier)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W0 so the layer runs at base speed; exact up to float rounding."""
        if self.merged:
            return
        w = self.weight
        w.copy_(self.merged_weight(w.float(), self.multiplier).to(w.dtype))
        self.merged, self.merged_multiplier, self.merge_tick = True, self.multiplier, next(_merge_clock)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of W0 (the one merge() added, whatever the multiplier is now)."""
        if not self.merged:
            return
        w = self.weight
        w.copy_(self.unmerged_weight(w.float()).to(w.dtype))
        self.merged, self.merged_multiplier, self.merge_tick = False, 0.0, -1


class Adapter(Mergeable, nn.Module):
    """A frozen nn.Linear / nn.Conv2d (or a stack of adapters on one) plus an update s·ΔW, s = alpha/r.

    y = base(x) + multiplier · op(x, s·ΔW), op being the layer's own linear map or convolution. Subclasses
    set `kind` (the name inject(adapter=...) takes) and give `update_weight()`; LoRA and DoRA also compute
    their forward from the factors instead of from the weight.
    """

    kind = "adapter"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None, rs: bool, dropout: float,
                 multiplier: float, name: str) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"{self.kind} rank must be >= 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        # No alpha (or 0, as sd-scripts and LyCORIS read it) means alpha = rank, i.e. scale 1.
        self.alpha = float(rank if not alpha else alpha)
        self.rs = bool(rs)
        self.multiplier = float(multiplier)
        self.name = name
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_merge_state()
        self.pissa = False
        layer = self.base_layer
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{self.kind} wraps an nn.Linear or nn.Conv2d, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
            raise ValueError(f"{self.kind} supports convs with groups=1 and zero padding; got groups={layer.groups}, "
                             f"padding_mode={layer.padding_mode!r}")

    # -- the scale ---------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) for rank-stabilised scaling (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rs else self.rank)

    # -- the frozen layer at the bottom of the stack ------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        layer = self.base
        while isinstance(layer, Adapter):
            layer = layer.base
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    def factory(self, dtype: torch.dtype | None) -> dict:
        """device and dtype for new factors: the base weight's, unless a dtype is given."""
        w = self.weight
        return dict(device=w.device, dtype=dtype or w.dtype)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """This layer's own trainable tensors (not those of the layers it wraps)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """This layer's own tensors under their names, which are the LyCORIS/kohya file keys (without `.alpha`)."""
        return {n: p.detach() for n, p in self.named_parameters() if not n.startswith("base.")}

    def live_below(self) -> torch.Tensor | float:
        """The sum of the live (unmerged) updates of the adapters this one wraps, float32; 0.0 when there are none."""
        total: torch.Tensor | float = 0.0
        layer = self.base
        while isinstance(layer, Adapter):
            if not layer.merged and layer.multiplier != 0.0:
                total = total + layer.delta_weight()
            layer = layer.base
        return total

    def wrapped_weight(self) -> torch.Tensor:
        """The weight of the layer this one wraps as it computes: W0 (with what is merged into it) plus the live
        updates of the adapters below, float32, no gradient."""
        with torch.no_grad():
            return self.weight.float() + self.live_below()

    # -- the update as a weight -----------------------------------------------------------------------
    def update_weight(self) -> torch.Tensor:
        """s·ΔW shaped like W0, in the factors' dtype, differentiable in the factors."""
        raise NotImplementedError

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x through the wrapped layer's map with another weight and no bias (same stride, padding, dilation)."""
        layer = self.base_layer
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
        return F.linear(x, weight)

    # -- forward ---------------------------------------------------------------------------------------
    def inputs(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x for the update branch: dropout, then the factors' dtype (under autocast the matmuls pick theirs)."""
        x = self.dropout(x)
        return x if autocast_enabled(x.device.type) else x.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.multiplier == 0.0:
            return y
        w = self.update_weight()
        return y + self.multiplier * self.op(self.inputs(x, w.dtype), w).to(y.dtype)

    def extra_repr(self) -> str:
        rule = "alpha/sqrt(r)" if self.rs else "alpha/r"
        return (f"name={self.name!r}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g} ({rule}), "
                f"multiplier={self.multiplier:g}, merged={self.merged}")

"""LoRA (Hu et al. 2021): a frozen linear or conv layer plus a trainable low-rank update, y = W0·x + b + s·B(A(x)).

For a kxk conv, A is a kxk conv with r outputs and B a 1x1 conv (LoCon); with tucker=True the kernel moves into a
small r×r×k×k core between two 1x1 convs, A -> lora_mid -> B (LyCORIS's Tucker/CP LoCon), so that
ΔW[o,i,h,w] = Σ B[o,p]·mid[p,q,h,w]·A[q,i].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter

INITS = ("kaiming", "gaussian", "pissa")


class _LoRALayer(Adapter):
    """What LoRALinear and LoRAConv share: the factors A (lora_down) and B (lora_up), and the three inits."""

    kind = "lora"

    # -- the update as a weight ---------------------------------------------------------------------
    def lora_weight(self, factor: float | None = None) -> torch.Tensor:
        """factor · B·A shaped like W0, in float32 (factor defaults to multiplier · scale)."""
        if factor is None:
            factor = self.multiplier * self.scale
        up = self.lora_up.weight.float().flatten(1)      # (out, r)
        down = self.lora_down.weight.float().flatten(1)  # (r, in·kh·kw), or (r, in) under a Tucker core
        mid = getattr(self, "lora_mid", None)
        if mid is None:
            return (factor * (up @ down)).view(self.weight.shape)
        return factor * torch.einsum("pqhw,op,qi->oihw", mid.weight.float(), up, down)

    def lora_update(self) -> torch.Tensor:
        """s·B·A shaped like W0, in the factors' dtype, differentiable."""
        up, down = self.lora_up.weight.flatten(1), self.lora_down.weight.flatten(1)
        mid = getattr(self, "lora_mid", None)
        if mid is None:
            return self.scale * (up @ down).view(self.weight.shape)
        return self.scale * torch.einsum("pqhw,op,qi->oihw", mid.weight, up, down)

    def update_weight(self) -> torch.Tensor:
        return self.lora_update()

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        m = self.multiplier if multiplier is None else multiplier
        with torch.no_grad():
            return self.lora_weight(m * self.scale)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)) (through lora_mid when there is one), unscaled."""
        h = self.lora_down(x)
        if getattr(self, "lora_mid", None) is not None:
            h = self.lora_mid(h)
        return self.lora_up(h)

    # -- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora(self, init: str = "kaiming") -> None:
        """Initialise A and B so that B·A = 0 (or, for PiSSA, so that W_res + s·B·A = W0)."""
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}; expected one of {INITS}")
        if init == "pissa":
            self._init_pissa()
            return
        if init == "kaiming":
            # As in microsoft/LoRA: nn.Linear's default init for A; B = 0 makes the update start at zero.
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_down.weight, std=1.0 / self.rank)
        if getattr(self, "lora_mid", None) is not None:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @torch.no_grad()
    def _init_pissa(self) -> None:
        """PiSSA: A, B from the top-r singular triplets of W0; the residual W0 - s·B·A replaces W0, frozen."""
        if self.merged or self.pissa:
            raise ValueError("PiSSA init must run once, on an unmerged layer")
        if getattr(self, "lora_mid", None) is not None:
            raise ValueError("PiSSA init needs plain A and B: it does not combine with a Tucker core (tucker=True)")
        w = self.weight
        if w.is_meta:
            raise ValueError("PiSSA init needs real weights (the base layer is on the meta device)")
        w0 = w.float().flatten(1)  # (out, in·kh·kw)
        if self.rank > min(w0.shape):
            raise ValueError(f"PiSSA rank {self.rank} exceeds min{tuple(w0.shape)} of the weight")
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        # Split sqrt(S_r / scale) over both factors, so that scale·B·A is exactly the top-r part of W0.
        root = (s[: self.rank] / self.scale).sqrt()
        down = root[:, None] * vh[: self.rank]
        up = u[:, : self.rank] * root[None, :]
        self.lora_down.weight.copy_(down.view_as(self.lora_down.weight))
        self.lora_up.weight.copy_(up.view_as(self.lora_up.weight))
        w.copy_((w0 - self.scale * (up @ down)).view_as(w).to(w.dtype))
        # The starting factors: a file must carry s·(B·A - B0·A0), the change relative to the true W0.
        self.register_buffer("pissa_down0", self.lora_down.weight.detach().clone())
        self.register_buffer("pissa_up0", self.lora_up.weight.detach().clone())
        self.pissa = True

    def pissa_offset(self) -> torch.Tensor:
        """What PiSSA subtracted from W0 at init (s·B0·A0), shaped like W0, float32."""
        up0 = self.pissa_up0.float().flatten(1)
        down0 = self.pissa_down0.float().flatten(1)
        return (self.scale * (up0 @ down0)).view(self.weight.shape)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.multiplier == 0.0:
            return y
        # The factors may be kept in float32 under a half-precision base; compute in theirs, add in y's.
        h = self.branch(self.inputs(x, self.lora_down.weight.dtype))
        # In place: y is the base layer's fresh output, which its backward does not need.
        return y.add_(h.to(y.dtype), alpha=self.multiplier * self.scale)

    def extra_repr(self) -> str:
        tucker = ", tucker" if getattr(self, "lora_mid", None) is not None else ""
        return super().extra_repr() + tucker + (", pissa" if self.pissa else "")


class LoRALinear(_LoRALayer):
    """y = base(x) + multiplier · s · B(A(dropout(x))), with A = lora_down.weight (r×in), B = lora_up.weight (out×r)."""

    def __init__(self, base: nn.Linear | Adapter, rank: int, alpha: float | None = None, *, rs: bool = False,
                 dropout: float = 0.0, init: str = "kaiming", multiplier: float = 1.0, name: str = "default",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(base, rank, alpha, rs, dropout, multiplier, name)
        layer = self.base_layer
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(layer).__name__}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        kw = self.factory(dtype)
        self.lora_down = nn.Linear(self.in_features, self.rank, bias=False, **kw)
        self.lora_up = nn.Linear(self.rank, self.out_features, bias=False, **kw)
        self.reset_lora(init)


class LoRAConv(_LoRALayer):
    """LoRA for nn.Conv2d: A is a conv with the base's kernel, stride and padding and r outputs; B is a 1x1 conv.

    Since B only mixes channels, B(A(x)) is the conv of x with the kernel B·A (LoCon for kxk kernels).
    tucker=True (kernels larger than 1x1): A and B are 1x1 convs and the kernel sits in lora_mid, r -> r channels.
    """

    def __init__(self, base: nn.Conv2d | Adapter, rank: int, alpha: float | None = None, *, rs: bool = False,
                 dropout: float = 0.0, init: str = "kaiming", multiplier: float = 1.0, name: str = "default",
                 dtype: torch.dtype | None = None, tucker: bool = False) -> None:
        super().__init__(base, rank, alpha, rs, dropout, multiplier, name)
        layer = self.base_layer
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"LoRAConv wraps an nn.Conv2d, got {type(layer).__name__}")
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size = layer.kernel_size
        kw = self.factory(dtype)
        geometry = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        if tucker and any(k > 1 for k in layer.kernel_size):
            self.lora_down = nn.Conv2d(self.in_channels, self.rank, 1, bias=False, **kw)
            self.lora_mid = nn.Conv2d(self.rank, self.rank, *geometry, bias=False, **kw)
        else:
            self.lora_down = nn.Conv2d(self.in_channels, self.rank, *geometry, bias=False, **kw)
        self.lora_up = nn.Conv2d(self.rank, self.out_channels, 1, bias=False, **kw)
        self.reset_lora(init)


LORA_LAYERS = (LoRALinear, LoRAConv)


def wrap(module: nn.Module, rank: int, alpha: float | None = None, *, tucker: bool = False,
         **kwargs) -> LoRALinear | LoRAConv:
    """The LoRA layer for `module` (an nn.Linear, an nn.Conv2d, or an adapter to stack on).
    tucker: kxk convs get a Tucker core (lora_mid) between two 1x1 factors, as LyCORIS's use_tucker."""
    base = module.base_layer if isinstance(module, Adapter) else module
    if isinstance(base, nn.Linear):
        return LoRALinear(module, rank, alpha, **kwargs)
    if isinstance(base, nn.Conv2d):
        return LoRAConv(module, rank, alpha, tucker=tucker, **kwargs)
    raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d, got {type(module).__name__}")


def lora_params(rank: int, layer: nn.Module) -> tuple[int, int]:
    """(d·k, r·(d+k)): weights in the frozen layer vs in its rank-r update (k counts kernel taps for convs)."""
    w = layer.base_layer.weight if isinstance(layer, Adapter) else layer.weight
    d, k = w.shape[0], w[0].numel()
    return d * k, rank * (d + k)

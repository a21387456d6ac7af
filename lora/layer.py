"""LoRA layers: a frozen linear or conv layer plus a trainable low-rank update, y = W0·x + b + s·B(A(x))."""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("kaiming", "gaussian", "pissa")


def _autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class _LoRALayer(nn.Module):
    """What LoRALinear and LoRAConv share: the factors, the scale, merging, and the three inits.

    `base` is the wrapped layer: a plain nn.Linear / nn.Conv2d, or another LoRA layer when several
    LoRAs are stacked on one module. Its weight W0 is frozen and never copied.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None, rs: bool, dropout: float,
                 multiplier: float, name: str) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        # No alpha means alpha = rank, i.e. scale 1: the convention of every LoRA file reader.
        self.alpha = float(rank if alpha is None else alpha)
        self.rs = bool(rs)
        self.multiplier = float(multiplier)
        self.name = name
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_factor = 0.0  # multiplier * scale at merge time, so unmerge removes exactly what was added
        self.pissa = False

    # -- the scale -------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rs else self.rank)

    # -- the frozen layer at the bottom of the stack --------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        layer = self.base
        while isinstance(layer, _LoRALayer):
            layer = layer.base
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # -- the update as a weight ---------------------------------------------------------------------
    def lora_weight(self, factor: float | None = None) -> torch.Tensor:
        """factor · B·A shaped like W0, in float32 (factor defaults to multiplier · scale)."""
        if factor is None:
            factor = self.multiplier * self.scale
        up = self.lora_up.weight.float().flatten(1)      # (out, r)
        down = self.lora_down.weight.float().flatten(1)  # (r, in·kh·kw)
        return (factor * (up @ down)).view(self.weight.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W0 so the layer runs at base speed; exact up to float rounding."""
        if self.merged:
            return
        w = self.weight
        factor = self.multiplier * self.scale
        w.copy_((w.float() + self.lora_weight(factor)).to(w.dtype))
        self._merged_factor, self.merged = factor, True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of W0 (the one added by merge(), whatever the multiplier is now)."""
        if not self.merged:
            return
        w = self.weight
        w.copy_((w.float() - self.lora_weight(self._merged_factor)).to(w.dtype))
        self._merged_factor, self.merged = 0.0, False

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
        nn.init.zeros_(self.lora_up.weight)

    @torch.no_grad()
    def _init_pissa(self) -> None:
        """PiSSA: A, B from the top-r singular triplets of W0; the residual W0 - s·B·A replaces W0, frozen."""
        if self.merged or self.pissa:
            raise ValueError("PiSSA init must run once, on an unmerged layer")
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
        # Under autocast the matmuls run in the autocast dtype whatever x is, so casting x would only copy it.
        x = self.dropout(x)
        if not _autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        h = self.lora_down(x)
        # In place: y is the base layer's fresh output, which its backward does not need.
        return y.add_(self.lora_up(h).to(y.dtype), alpha=self.multiplier * self.scale)

    def extra_repr(self) -> str:
        rule = "alpha/sqrt(r)" if self.rs else "alpha/r"
        return (f"name={self.name!r}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g} ({rule}), "
                f"multiplier={self.multiplier:g}, merged={self.merged}" + (", pissa" if self.pissa else ""))


class LoRALinear(_LoRALayer):
    """y = base(x) + multiplier · s · B(A(dropout(x))), with A = lora_down.weight (r×in), B = lora_up.weight (out×r)."""

    def __init__(self, base: nn.Linear | LoRALinear, rank: int, alpha: float | None = None, *, rs: bool = False,
                 dropout: float = 0.0, init: str = "kaiming", multiplier: float = 1.0, name: str = "default",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(base, rank, alpha, rs, dropout, multiplier, name)
        layer = self.base_layer
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(layer).__name__}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        kw = dict(device=layer.weight.device, dtype=dtype or layer.weight.dtype)
        self.lora_down = nn.Linear(self.in_features, self.rank, bias=False, **kw)
        self.lora_up = nn.Linear(self.rank, self.out_features, bias=False, **kw)
        self.reset_lora(init)


class LoRAConv(_LoRALayer):
    """LoRA for nn.Conv2d: A is a conv with the base's kernel, stride and padding and r outputs; B is a 1x1 conv.

    Since B only mixes channels, B(A(x)) is the conv of x with the kernel B·A (LoCon for kxk kernels).
    """

    def __init__(self, base: nn.Conv2d | LoRAConv, rank: int, alpha: float | None = None, *, rs: bool = False,
                 dropout: float = 0.0, init: str = "kaiming", multiplier: float = 1.0, name: str = "default",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(base, rank, alpha, rs, dropout, multiplier, name)
        layer = self.base_layer
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"LoRAConv wraps an nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError(f"LoRAConv supports groups=1, zero padding; got groups={layer.groups}, "
                             f"padding_mode={layer.padding_mode!r}")
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size = layer.kernel_size
        kw = dict(device=layer.weight.device, dtype=dtype or layer.weight.dtype)
        self.lora_down = nn.Conv2d(self.in_channels, self.rank, layer.kernel_size, layer.stride, layer.padding,
                                   layer.dilation, bias=False, **kw)
        self.lora_up = nn.Conv2d(self.rank, self.out_channels, 1, bias=False, **kw)
        self.reset_lora(init)


LORA_LAYERS = (LoRALinear, LoRAConv)


def wrap(module: nn.Module, rank: int, alpha: float | None = None, **kwargs) -> LoRALinear | LoRAConv:
    """The LoRA layer for `module` (an nn.Linear, an nn.Conv2d, or a LoRA layer to stack on)."""
    base = module.base_layer if isinstance(module, _LoRALayer) else module
    if isinstance(base, nn.Linear):
        return LoRALinear(module, rank, alpha, **kwargs)
    if isinstance(base, nn.Conv2d):
        return LoRAConv(module, rank, alpha, **kwargs)
    raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d, got {type(module).__name__}")


def lora_params(rank: int, layer: nn.Module) -> tuple[int, int]:
    """(d·k, r·(d+k)): weights in the frozen layer vs in its rank-r update (k counts kernel taps for convs)."""
    w = layer.base_layer.weight if isinstance(layer, _LoRALayer) else layer.weight
    d, k = w.shape[0], w[0].numel()
    return d * k, rank * (d + k)

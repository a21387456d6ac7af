"""DoRA (Liu et al. 2024): weight-decomposed LoRA, W' = m · V / ‖V‖_c with V = W0 + s·B·A.

The direction V is W0 plus an ordinary LoRA update; the magnitude m is a learned vector, initialised to ‖W0‖_c so
that W' = W0 at step 0. Axis: the paper's W is d×k with k outputs and ‖·‖_c a norm per column, i.e. per OUTPUT
channel; in PyTorch's (out, in, kh, kw) layout that is one norm per row, over the inputs and kernel taps. So do peft
(`lora_magnitude_vector`, shape (out,)) and LyCORIS (`dora_scale`, shape (out, 1) or (out, 1, 1, 1), its default
wd_on_output=True). Older LyCORIS files norm each input channel instead (dora_scale (1, in, ...)): wd_on_output=False
reads those. As the paper suggests (section 4.3) and peft does, ‖V‖ is treated as a constant in the backward pass.

The multiplier μ scales the whole change: W0 + μ·(W' − W0), so 0 is the base and 1 the adapter, as ComfyUI applies it.
Stacked on other adapters, W0 is the weight of the layer DoRA wraps as that layer computes it (see lora/base.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter
from .layer import LoRAConv, LoRALinear


class _DoRA:
    """What DoRALinear and DoRAConv add to their LoRA layer: the magnitude `dora_scale` and the normalised weight."""

    kind = "dora"

    def init_magnitude(self, wd_on_output: bool, dtype: torch.dtype | None) -> None:
        self.wd_on_output = bool(wd_on_output)
        with torch.no_grad():
            m = self.column_norm(self.weight.float())
        self.dora_scale = nn.Parameter(m.to(dtype or self.weight.dtype))

    def column_norm(self, v: torch.Tensor) -> torch.Tensor:
        """‖v‖ per output channel, shaped (out, 1[, 1, 1]); with wd_on_output=False per input channel,
        shaped (1, in[, 1, 1])."""
        if self.wd_on_output:
            return v.flatten(1).norm(dim=1).view(-1, *[1] * (v.ndim - 1))
        return v.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, *[1] * (v.ndim - 2))

    def direction(self) -> torch.Tensor:
        """V = W0 + s·B·A in float32, differentiable in A and B (W0: the wrapped layer's weight, see lora/base.py)."""
        return self.wrapped_weight() + self.lora_update().float()

    def update_weight(self) -> torch.Tensor:
        """W' − W0 = m · V / ‖V‖ − W0 (what multiplier 1 adds), float32."""
        v = self.direction()
        return self.dora_scale.float() * v / self.column_norm(v).detach() - self.wrapped_weight()

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        return Adapter.delta_weight(self, multiplier)

    # -- merging: W ← W + μ·(g⊙V − W0) with W0 = W + L (L: live updates below), V = W0 + s·B·A, g = m/‖V‖;
    # the inverse needs ‖V‖, which is kept from the merge.
    def merged_weight(self, w: torch.Tensor, multiplier: float) -> torch.Tensor:
        with torch.no_grad():
            w0 = w + self.live_below()
            v = w0 + self.lora_update().float()
            self.merged_norm = self.column_norm(v)
            return w + multiplier * (self.dora_scale.float() * v / self.merged_norm - w0)

    def unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        # merged = W·(1 + μ·(g − 1)) + μ·(g − 1)·L + μ·g·s·B·A, solved for W.
        with torch.no_grad():
            mu, g = self.merged_multiplier, self.dora_scale.float() / self.merged_norm
            return (w - mu * (g - 1) * self.live_below() - mu * g * self.lora_update().float()) / (1 + mu * (g - 1))

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.multiplier == 0.0 or not self.wd_on_output:
            return Adapter.forward(self, x)  # merged / off, or the per-input-channel norm: through the weight
        y = self.base(x)
        # g = m / ‖V‖ per output channel scales W0·x and the LoRA branch alike: W'·x = g⊙(W0·x + s·B·A·x).
        with torch.no_grad():
            norm = self.column_norm(self.direction())
        channels = (-1, 1, 1) if self.is_conv else (-1,)  # where the output channels are in y
        g = (self.dora_scale.float() / norm).view(channels)
        w0x = y if self.bias is None else y - self.bias.view(channels)  # the wrapped layer's W0·x, without its bias
        h = self.branch(self.inputs(x, self.lora_down.weight.dtype))
        return y + (self.multiplier * ((g - 1) * w0x + g * self.scale * h)).to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.wd_on_output else ", norm per input channel")


class DoRALinear(_DoRA, LoRALinear):
    """DoRA on an nn.Linear: LoRALinear's A and B, plus the magnitude dora_scale (out, 1)."""

    def __init__(self, base: nn.Linear | Adapter, rank: int, alpha: float | None = None, *,
                 wd_on_output: bool = True, dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(base, rank, alpha, dtype=dtype, **kwargs)
        self.init_magnitude(wd_on_output, dtype)


class DoRAConv(_DoRA, LoRAConv):
    """DoRA on an nn.Conv2d: LoRAConv's factors (lora_mid too with tucker=True), plus dora_scale (out, 1, 1, 1)."""

    def __init__(self, base: nn.Conv2d | Adapter, rank: int, alpha: float | None = None, *,
                 wd_on_output: bool = True, dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(base, rank, alpha, dtype=dtype, **kwargs)
        self.init_magnitude(wd_on_output, dtype)


def wrap(module: nn.Module, rank: int, alpha: float | None = None, *, tucker: bool = False, wd_on_output: bool = True,
         init: str = "kaiming", **kwargs) -> DoRALinear | DoRAConv:
    """The DoRA layer for `module`. init: kaiming or gaussian for A (B starts at zero, so W' = W0 at step 0)."""
    if init == "pissa":
        raise ValueError("DoRA does not take the PiSSA init: its magnitude starts at ‖W0‖, which PiSSA would change")
    base = module.base_layer if isinstance(module, Adapter) else module
    if isinstance(base, nn.Linear):
        return DoRALinear(module, rank, alpha, wd_on_output=wd_on_output, init=init, **kwargs)
    if isinstance(base, nn.Conv2d):
        return DoRAConv(module, rank, alpha, wd_on_output=wd_on_output, init=init, tucker=tucker, **kwargs)
    raise TypeError(f"DoRA supports nn.Linear and nn.Conv2d, got {type(module).__name__}")

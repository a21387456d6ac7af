"""3x3 convolutions as one matrix product on CPU, with im2col in C++ (im2col.cpp); used by layers.Conv2d.

`product3x3(x, weight, bias)` is `F.conv2d(x, weight, bias, padding=1)` computed as one matrix product
W (out, c·9) · cols (c·9, n·h·w), the columns unfolded in C++ (`unfold3x3`: F.unfold's rows, the batch along the
columns). Backward takes gradᵀ·W, which reads the weight as it lies, and folds the columns back in C++ (`fold3x3`),
summing the nine contributions to each pixel in float32 and rounding once (PyTorch's bf16 fold rounds after every
addition). `usable(x)` says whether this path takes x: a bf16 or float32 CPU tensor, and the kernel built (see
build.py). The `im2col` switch (switches.py; SD_LORA_IM2COL=0) turns it off.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import build

SOURCE = Path(__file__).with_name("im2col.cpp")
KERNEL = build.Kernel("sd_lora_im2col", SOURCE, "im2col kernel")


def usable(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.ndim == 4 and x.dtype in (torch.bfloat16, torch.float32)
            and KERNEL.get() is not None)


class _Product3x3(torch.autograd.Function):
    """W·cols with cols = unfold3x3(x); backward reads W in place (gradᵀ·W) and folds in C++."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias):
        cols = KERNEL.ext.unfold3x3(x)                                   # (c·9, n·h·w)
        w2 = weight.flatten(1)                                            # (out, c·9)
        out = w2 @ cols if bias is None else torch.addmm(bias[:, None], w2, cols)
        ctx.size = (x.shape[0], x.shape[2], x.shape[3])
        # Only a trainable weight needs the columns (dW = grad·colsᵀ); a frozen one keeps just itself.
        ctx.save_for_backward(w2, cols if ctx.needs_input_grad[1] else None)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        w2, cols = ctx.saved_tensors
        n, h, w = ctx.size
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # gradᵀ·W streams W row by row as it lies; Wᵀ·grad would read it across its rows, which for SD's
            # 30-60 MB weights at 4x4-8x8 takes up to twice as long (bench/README.md). fold3x3 takes the
            # transposed result through its strides.
            grad_x = KERNEL.ext.fold3x3((grad.t() @ w2).t(), n, h, w)
        if ctx.needs_input_grad[1]:
            grad_w = (grad @ cols.t()).view(w2.shape[0], -1, 3, 3)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(1)
        return grad_x, grad_w, grad_b


def product3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) as one matrix product, returned as (out, n·h·w): column b·h·w + y·w + x
    is pixel (y, x) of image b. For a 3x3 weight; under autocast the product runs in autocast's dtype."""
    if KERNEL.get() is None:
        raise RuntimeError("the im2col kernel is not available on this machine (see usable())")
    return _Product3x3.apply(x, weight, bias)

"""float32 3x3 convolutions on CPU by Winograd F(4x4, 3x3) (winograd.cpp): 4x fewer multiplies than a direct conv.

`conv3x3(x, weight, bias)` equals `F.conv2d(x, weight, bias, padding=1)` for float32 CPU tensors, with about 10x
the rounding error of a direct fp32 conv (a few 1e-6 relative; bf16 is at 1e-3). Its backward (input gradient
only: the weight must be frozen, as in LoRA training) is the same transform on the rotated filters.
`usable(x, conv)` says whether a conv layer may take this path: float32, 3x3, stride 1, zero padding 1, no weight
gradient wanted (frozen, or autograd off), enough pixels and channels for the 36 matrix products to beat oneDNN's
direct conv, and the kernel built (see build.py). The UNet's and the VAE's convs ask it (layers.py).
The `winograd_conv` switch (switches.py; SD_LORA_WINOGRAD=0) turns it off.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import build

SOURCE = Path(__file__).with_name("winograd.cpp")
# Below this many 4x4 output tiles per call (batch · h/4 · w/4), or this many input or output channels, the 36
# products are too thin to beat oneDNN (measured on a 2-core Zen 4: 128 channels at 32x32, batch 2, is about even;
# 32-64 channels lose at any size, as do SD's 320->4 output conv and the convs into and out of the VAE's pixels).
# 64x64 latents (512 px) give 256 tiles per image, 32x32 give 64.
MIN_TILES = 128
MIN_CHANNELS = 128
# Floats per work buffer (transformed tiles of a chunk, transformed filters of an output-channel block, their
# products): 24 MB each, under glibc's 32 MiB mmap ceiling, so that they come back from the heap instead of as
# fresh pages. SD's UNet convs at 512 px then take one chunk; the VAE's at 256-512 pixels take several.
BUDGET_FLOATS = 6 << 20

KERNEL = build.Kernel("sd_lora_winograd", SOURCE, "Winograd conv kernel")


def usable(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    trainable = conv.weight.requires_grad or (conv.bias is not None and conv.bias.requires_grad)
    if trainable and torch.is_grad_enabled():
        return False  # a fine-tune of the convs themselves: the library conv gives the weight gradient
    if x.device.type != "cpu" or x.dtype != torch.float32 or conv.weight.dtype != torch.float32 or x.ndim != 4:
        return False
    if not (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"):
        return False
    tiles = x.shape[0] * ((x.shape[2] + 3) // 4) * ((x.shape[3] + 3) // 4)
    wide = min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
    return tiles >= MIN_TILES and wide and KERNEL.get() is not None


class _Conv3x3(torch.autograd.Function):
    """Forward and input gradient by Winograd; keeps only the (frozen) weight for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return KERNEL.ext.conv3x3(x, weight, bias, False, BUDGET_FLOATS)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors  # the input gradient is a conv of grad with the filters rotated and swapped
        return KERNEL.ext.conv3x3(grad.float(), weight, None, True, BUDGET_FLOATS), None, None


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) by Winograd; the weight and bias get no gradient."""
    if KERNEL.get() is None:
        raise RuntimeError("the Winograd conv kernel is not available on this machine (see usable())")
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    if trainable and torch.is_grad_enabled():
        raise ValueError("winograd.conv3x3 gives no weight or bias gradient; use F.conv2d for trainable filters")
    return _Conv3x3.apply(x, weight, bias)

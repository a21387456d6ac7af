"""The fast versions of the model layers, which fastpaths.apply swaps in: same parameters, same keys, same results
up to rounding.

Each class here subclasses a layer of unet/model.py (or nn.Conv2d) and changes only how it computes, never what:
a conv as one matrix product, a backward that keeps less, our C++ kernels where the CPU has them. Each path has
its switch in switches.py; with a switch off (or on a layer fastpaths.apply has not swapped) the architecture's
own forward runs. What each path gains, measured: bench/README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from unet import model as unet_model

from . import cpu_attention, im2col, winograd
from .switches import SWITCHES


class _FrozenConv2d(torch.autograd.Function):
    """A conv whose weight gets no gradient (LoRA training): backward needs the weight only, not the input.

    Autograd's conv keeps its input for a weight gradient whether or not one is wanted; for the UNet's frozen
    convs that input (a full feature map per conv) is dead weight in memory. Same kernels, forward and backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # autocast, if on, applies here

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return grad_x.to(dtype), None, None, None, None, None, None


class Conv2d(nn.Conv2d):
    """The UNet's convs (same parameters, same keys) with three shortcuts, all measured (bench/README.md):

    - On CPU, a conv over few pixels runs as one matrix product of its unfolded input (im2col). oneDNN re-lays out
      the whole weight at every call, forward and backward; when the weight dwarfs the activations (SD's
      1280-2560-channel convs at 8x8 and below) that costs more than the product, which a plain matmul reads in
      place. On a 2-core Zen 4 in bf16: 2.5-4x faster for 2560->1280 at 4x4-8x8, about 1.2x for 1280->1280 at
      8x8, slower from 16x16 up; hence the rule below. A 1x1 conv needs no unfolding, and as a matmul it is
      faster at every size measured (1.1-1.7x, forward and backward, 8x8 to 64x64), so it always takes this path.
      For 3x3 kernels the unfold and its backward fold are C++ where built (im2col.py), and backward reads the
      weight as it lies (gradᵀ·W). Other devices keep the library conv.
    - With a frozen weight, backward keeps the weight only (_FrozenConv2d), on every device.
    - On CPU in float32, frozen 3x3 convs over many pixels (SD's 320-640-channel convs at 32x32 and up) run by
      Winograd F(4x4, 3x3) (winograd.py): 1.5-2x faster than oneDNN's direct conv there, forward and backward,
      at about 10x the rounding error of a direct fp32 conv (still 1000x below bf16's).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (SWITCHES.matmul_conv and x.device.type == "cpu" and x.ndim == 4 and self._matmul_ok
                and (self.kernel_size[0] == 1 or x.shape[0] * x.shape[2] * x.shape[3] * 10 <= self.in_channels)):
            return self._matmul_forward(x)  # a frozen weight makes the matmul keep nothing but the weight
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if SWITCHES.winograd_conv and winograd.usable(x, self):
            return winograd.conv3x3(x, self.weight, self.bias)
        if SWITCHES.frozen_conv and frozen and torch.is_grad_enabled() and x.requires_grad \
                and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                       self.groups)
        return super().forward(x)

    def _matmul_forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        k = self.kernel_size[0]
        if k == 3 and SWITCHES.im2col and im2col.usable(x):
            out = im2col.product3x3(x, self.weight, self.bias)                    # (out, n·h·w)
        else:
            weight = self.weight.flatten(1)
            cols = F.unfold(x, k, padding=self.padding[0]) if k > 1 else x.flatten(2)  # (n, c·k·k, h·w)
            # One product for the whole batch, so the weight is read once.
            cols = cols[0] if n == 1 else cols.transpose(0, 1).flatten(1)             # (c·k·k, n·h·w)
            out = weight @ cols if self.bias is None else torch.addmm(self.bias[:, None], weight, cols)
        return out.view(1, -1, h, w) if n == 1 else out.view(-1, n, h, w).transpose(0, 1).contiguous()

    @property
    def _matmul_ok(self) -> bool:
        """Square odd kernel, 'same' zero padding, stride 1: the cases the unfold above reproduces exactly."""
        k = self.kernel_size[0]
        return (self.kernel_size == (k, k) and k % 2 == 1 and self.padding == (k // 2, k // 2)
                and self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros")


class WinogradConv2d(nn.Conv2d):
    """The VAE's convs (same parameters, same keys): on CPU in float32 its 3x3 convs go through Winograd F(4x4, 3x3)
    (winograd.py): 1.5-2x faster than oneDNN's direct conv at the VAE's sizes, at about 10x a direct fp32
    conv's rounding error (1000x below bf16's). Every other conv keeps the library conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if SWITCHES.winograd_conv and winograd.usable(x, self):
            return winograd.conv3x3(x, self.weight, self.bias)
        return super().forward(x)


class CrossAttention(unet_model.CrossAttention):
    """The same attention; on CPUs with AVX-512 BF16 the sum runs in our kernel (cpu_attention.cpp), in bf16 about
    twice as fast as PyTorch's for SD's head sizes."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if SWITCHES.cpu_attention and cpu_attention.usable(q, k, v):
            return cpu_attention.attention(q, k, v)
        return super().attend(q, k, v)


class _GatedGELU(torch.autograd.Function):
    """value * gelu(gate) for (value | gate) = the projection's output, keeping only that output for backward.

    Autograd would also keep gelu(gate), half as big again (4x the model width per token, in every transformer
    block: a tenth of all saved activations); backward recomputes it with one elementwise op instead.
    """

    @staticmethod
    def forward(ctx, projected: torch.Tensor) -> torch.Tensor:
        value, gate = projected.chunk(2, dim=-1)
        ctx.save_for_backward(projected)
        return value * F.gelu(gate)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        value, gate = projected.chunk(2, dim=-1)
        grad_value = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * value, gate)  # d gelu(gate) / d gate, times the incoming
        return torch.cat([grad_value, grad_gate], dim=-1)


class GEGLU(unet_model.GEGLU):
    """The same value * gelu(gate); when autograd records, backward recomputes the gelu (_GatedGELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.proj(x)
        if SWITCHES.gated_gelu and torch.is_grad_enabled() and projected.requires_grad:
            return _GatedGELU.apply(projected)
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)


class SpatialTransformer(unet_model.SpatialTransformer):
    """SD1's 1x1-conv projections applied per token, as linear maps: the layout change then comes free with the
    product instead of costing a copy of the feature map on each side (bench/README.md). Only while both are
    plain convs: a LoRA-wrapped projection gets the feature map it expects, through the architecture's forward."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        if not (SWITCHES.pointwise_proj and not self.use_linear
                and isinstance(self.proj_in, nn.Conv2d) and isinstance(self.proj_out, nn.Conv2d)):
            return super().forward(x, context, checkpointed)
        height, width = x.shape[-2:]
        h = rearrange(self.norm(x), "b c y x -> b (y x) c")
        # As one 2-D product: with a batch the token view is strided across samples, and a batched product
        # would copy the weight for each sample (measured slower); reshape copies the activations once instead.
        h = F.linear(h.reshape(-1, h.shape[-1]), self.proj_in.weight.flatten(1), self.proj_in.bias)
        h = h.view(x.shape[0], -1, h.shape[-1])
        for block in self.transformer_blocks:
            h = checkpoint(block, h, context, use_reentrant=False) if checkpointed else block(h, context)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + rearrange(h, "b (y x) c -> b c y x", y=height, x=width)

"""Attention on CPUs with AVX-512 BF16: builds cpu_attention.cpp once (cached) and wraps it for autograd.

`attention(q, k, v)` equals `F.scaled_dot_product_attention(q, k, v)` (default scale 1/sqrt(d), no mask) for
bf16 or float32 CPU tensors shaped [batch, heads, tokens, d]; `usable(q, k, v)` says whether this kernel takes them.
When the CPU lacks AVX-512 BF16 or the build fails (no compiler), `usable` is False and callers keep PyTorch's kernel.
The `cpu_attention` switch (switches.py; SD_LORA_CPU_ATTENTION=0) turns it off, SD_LORA_EXT_DIR moves the build cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import build

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
MAX_HEAD_DIM = 256

KERNEL = build.Kernel("sd_lora_cpu_attention", SOURCE, "CPU attention kernel")


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.device.type != "cpu" or not q.dtype == k.dtype == v.dtype or q.ndim != 4 or k.shape[-2] == 0:
        return False
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        return False  # no broadcasting over batch or heads, one head size for q, k and v
    if q.dtype == torch.bfloat16:
        fits = q.shape[-1] % 2 == 0  # bf16 products are summed in pairs along the head dimension
    else:
        fits = q.dtype == torch.float32
    return fits and q.shape[-1] <= MAX_HEAD_DIM and KERNEL.get() is not None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        scale = q.shape[-1] ** -0.5
        out, lse = KERNEL.ext.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        return tuple(KERNEL.ext.backward(q, k, v, out, lse, _unit_last(grad.to(q.dtype)), ctx.scale))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/sqrt(d))·v per batch and head; call only where usable(q, k, v)."""
    if KERNEL.get() is None:
        raise RuntimeError("the CPU attention kernel is not available on this machine (see usable())")
    return _Attention.apply(q, k, v)

"""Tests for fastpaths/cpu_attention: our bf16/fp32 attention kernel against PyTorch's, and the fallback."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastpaths
from fastpaths import Switches, cpu_attention
from unet import UNetModel
from unet import model as unet_model

needs_kernel = pytest.mark.skipif(
    not cpu_attention.usable(*(torch.zeros(1, 1, 1, 2, dtype=torch.bfloat16),) * 3),
    reason="no AVX-512 BF16 on this CPU, or the kernel could not be built")


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, n, h·d) -> (b, h, n, d) as a strided view, the layout the UNet hands over."""
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def _errors(batch, heads, lq, lk, d, dtype=torch.bfloat16, seed=0):
    """Relative errors of ours and of PyTorch's attention in `dtype`, both against PyTorch in the next wider
    precision (float32 for bf16, float64 for float32), for out, dq, dk, dv."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, lq, heads * d, generator=g)
    k = 1.5 * torch.randn(batch, lk, heads * d, generator=g)
    v = torch.randn(batch, lk, heads * d, generator=g)
    grad = torch.randn(batch, heads, lq, d, generator=g)

    def run(fn, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_(True) for t in (q, k, v)]
        out = fn(*(_heads(t, heads) for t in leaves))
        out.backward(grad.to(dtype))
        return [out.double()] + [t.grad.double() for t in leaves]

    wide = torch.float32 if dtype == torch.bfloat16 else torch.float64
    want = [t.to(torch.float64) for t in run(F.scaled_dot_product_attention, wide)]
    ours = run(cpu_attention.attention, dtype)
    torchs = run(F.scaled_dot_product_attention, dtype)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return [rel(a, w) for a, w in zip(ours, want)], [rel(a, w) for a, w in zip(torchs, want)]


@needs_kernel
@pytest.mark.parametrize("batch,heads,lq,lk,d", [
    (1, 8, 256, 256, 40),   # SD1 self-attention, first level (fewer tokens)
    (2, 4, 100, 77, 40),    # cross-attention over a prompt: keys not a multiple of 16
    (1, 2, 64, 64, 160),    # SD1's deepest level
    (2, 3, 33, 130, 80),    # odd query count (backward pairs queries up), keys over one block
    (1, 2, 1, 5, 64),       # a single query
    (1, 1, 9, 300, 6),      # head size not a multiple of 16
])
def test_matches_pytorch_attention_forward_and_backward(one_thread, batch, heads, lq, lk, d):
    ours, torchs = _errors(batch, heads, lq, lk, d)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, torchs):
        # bf16 rounding of inputs, P and dS: about 0.3 %; ours must be as close to fp32 as PyTorch's bf16 kernel.
        assert a < 1.5 * b + 1e-3, f"{name}: ours {a:.4f} vs PyTorch bf16 {b:.4f}"
        assert a < 0.01, name


@needs_kernel
@pytest.mark.parametrize("batch,heads,lq,lk,d", [(1, 4, 256, 256, 40), (2, 3, 33, 130, 80), (1, 2, 7, 5, 7)])
def test_float32_matches_pytorch_to_float32_accuracy(one_thread, batch, heads, lq, lk, d):
    ours, torchs = _errors(batch, heads, lq, lk, d, dtype=torch.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, torchs):
        assert a < 3 * b + 1e-6, f"{name}: ours {a:.2e} vs PyTorch float32 {b:.2e}"


@needs_kernel
def test_layouts_and_output_view(one_thread):
    """Contiguous and strided inputs give the same result; the output is a (b, h, n, d) view of (b, n, h, d)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 20, 8, dtype=torch.bfloat16) for _ in range(3))
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    a, b = cpu_attention.attention(q, k, v), cpu_attention.attention(*strided)
    assert torch.equal(a, b)
    assert a.shape == (2, 4, 20, 8) and a.transpose(1, 2).is_contiguous()


@needs_kernel
def test_unet_bf16_with_and_without_the_kernel(one_thread, monkeypatch):
    """A bf16 UNet forward and backward through our kernel is as close to the float32 UNet as through PyTorch's
    bf16 attention, and the kernel is what runs by default."""
    from tests.helpers import RICH, randomize

    fp32 = randomize(UNetModel(dataclasses.replace(RICH, use_linear_in_transformer=False)))
    bf16 = fastpaths.apply(UNetModel(fp32.cfg).to(torch.bfloat16))
    bf16.load_state_dict(fp32.state_dict())
    g = torch.Generator().manual_seed(0)
    x0, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, RICH.context_dim, generator=g)
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: calls.append(1) or real(*a))

    def run(unet, on: bool):
        dtype = next(unet.parameters()).dtype
        x = x0.to(dtype, copy=True).requires_grad_(True)
        with fastpaths.switched(cpu_attention=on):
            y = unet(x, torch.tensor([10, 700]), c.to(dtype))
            (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.float(), x.grad.float()

    layers = sum(isinstance(m, unet_model.CrossAttention) for m in bf16.modules())
    ours = run(bf16, True)
    assert len(calls) == layers > 0
    torchs, want = run(bf16, False), run(fp32, False)
    assert len(calls) == layers  # the switched-off runs did not go through it
    for a, b, w in zip(ours, torchs, want):
        err_ours, err_torch = ((a - w).norm() / w.norm()).item(), ((b - w).norm() / w.norm()).item()
        assert err_ours < 1.5 * err_torch + 1e-3, (err_ours, err_torch)


def test_not_used_where_it_does_not_apply():
    """float16, float64, mixed dtypes and odd bf16 head sizes stay with PyTorch's attention."""
    for dtype, d in ((torch.float16, 8), (torch.float64, 8), (torch.bfloat16, 7)):
        t = torch.zeros(1, 1, 4, d, dtype=dtype)
        assert not cpu_attention.usable(t, t, t)
    a, b = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    assert not cpu_attention.usable(a, b, b)
    q, kv = torch.zeros(2, 1, 4, 8), torch.zeros(1, 1, 3, 8)  # a context broadcast over the batch
    assert not cpu_attention.usable(q, kv, kv)


def test_build_failure_falls_back_with_a_warning(broken_build):
    """No compiler (or any build error): one warning, then PyTorch's attention; attention() itself says why."""
    broken_build(cpu_attention.KERNEL)
    t = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="no compiler here"):
        assert not cpu_attention.usable(t, t, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_attention.usable(t, t, t)  # tried once per process
    with pytest.raises(RuntimeError, match="not available"):
        cpu_attention.attention(t, t, t)


def test_switched_off_by_environment(monkeypatch):
    """SD_LORA_CPU_ATTENTION=0 starts the process with this switch off, and a switched-off kernel is never built."""
    monkeypatch.setenv("SD_LORA_CPU_ATTENTION", "0")
    assert Switches.from_environment() == Switches(cpu_attention=False)
    monkeypatch.setattr(cpu_attention.KERNEL, "state", "untried")  # forget this process's outcome
    monkeypatch.setattr(cpu_attention.KERNEL, "ext", None)
    attention = fastpaths.layers.CrossAttention(8, 2, 4).to(torch.bfloat16)
    with fastpaths.switched(Switches.from_environment()), torch.no_grad():
        attention(torch.zeros(1, 4, 8, dtype=torch.bfloat16))
    assert cpu_attention.KERNEL.state == "untried"

"""Tests for fastpaths/im2col: 3x3 convs as one product with C++ unfold/fold, against F.unfold and F.conv2d."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastpaths
from fastpaths import Switches, im2col
from fastpaths.layers import Conv2d

needs_kernel = pytest.mark.skipif(im2col.KERNEL.get() is None, reason="im2col kernel not built on this machine")
SIZES = [(1, 16, 4, 4), (2, 8, 3, 5), (1, 8, 1, 1), (3, 4, 1, 7), (2, 4, 6, 2)]  # one pixel, one row, one column


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,h,w", SIZES)
def test_unfold_is_f_unfold_with_the_batch_along_the_columns(n, c, h, w, dtype):
    x = torch.randn(n, c, h, w).to(dtype)
    want = F.unfold(x, 3, padding=1).transpose(0, 1).flatten(1)  # (c·9, n·h·w)
    assert torch.equal(im2col.KERNEL.ext.unfold3x3(x), want)
    assert torch.equal(im2col.KERNEL.ext.unfold3x3(x.transpose(2, 3).contiguous().transpose(2, 3)), want)


@needs_kernel
@pytest.mark.parametrize("n,c,h,w", SIZES)
def test_fold_is_the_adjoint_in_either_layout(n, c, h, w):
    """<unfold(x), g> = <x, fold(g)>, and fold reads a transposed g through its strides."""
    g = torch.randn(c * 9, n * h * w, dtype=torch.float64).float()
    x = torch.randn(n, c, h, w)
    folded = im2col.KERNEL.ext.fold3x3(g, n, h, w)
    assert torch.equal(im2col.KERNEL.ext.fold3x3(g.t().contiguous().t(), n, h, w), folded)
    lhs = (im2col.KERNEL.ext.unfold3x3(x).double() * g.double()).sum()
    assert abs(lhs - (x.double() * folded.double()).sum()) < 1e-4 * lhs.abs().clamp(min=1)
    want = F.fold(g.view(c * 9, n, h * w).transpose(0, 1), (h, w), 3, padding=1)
    torch.testing.assert_close(folded, want, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_bf16_fold_rounds_once():
    """Nine bf16 contributions per pixel summed in float32: closer to the exact sum than PyTorch's bf16 fold."""
    g = torch.randn(1280 * 9, 64).bfloat16()
    exact = F.fold(g.double().view(1280 * 9, 1, 64).transpose(0, 1), (8, 8), 3, padding=1)
    ours = im2col.KERNEL.ext.fold3x3(g, 1, 8, 8)
    torch_bf16 = F.fold(g.view(1280 * 9, 1, 64).transpose(0, 1), (8, 8), 3, padding=1)
    assert ours.dtype == torch.bfloat16
    assert rel(ours, exact) < 0.6 * rel(torch_bf16, exact)


@needs_kernel
@pytest.mark.parametrize("n,c,h,w", SIZES)
@pytest.mark.parametrize("trainable", [False, True])
def test_product_matches_conv2d_forward_and_backward(n, c, h, w, trainable):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    weight = (torch.randn(6, c, 3, 3, generator=g) / (3 * c ** 0.5)).requires_grad_(trainable)
    bias = torch.randn(6, generator=g).requires_grad_(trainable)
    out = im2col.product3x3(x, weight, bias)
    assert out.shape == (6, n * h * w)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    want = F.conv2d(xd, wd, bd, padding=1)
    want.backward(grad.view(6, n, h, w).transpose(0, 1).double())
    assert rel(out.view(6, n, h, w).transpose(0, 1), want) < 1e-6
    assert rel(x.grad, xd.grad) < 1e-6
    if trainable:
        assert rel(weight.grad, wd.grad) < 1e-6 and rel(bias.grad, bd.grad) < 1e-6
    else:
        assert weight.grad is None and bias.grad is None


@needs_kernel
def test_frozen_product_keeps_no_columns():
    """A frozen weight: backward keeps the weight only, not the unfolded input (9x the input)."""
    x = torch.randn(1, 64, 4, 4, requires_grad=True)
    weight = torch.randn(8, 64, 3, 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        im2col.product3x3(x, weight, None)
    assert sum(t.numel() for t in saved) == weight.numel()


@needs_kernel
def test_bf16_autocast_with_float32_weights():
    """Under autocast the product runs in bf16 as W·cols would; the input gradient comes back in float32."""
    conv = Conv2d(64, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 64, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    want = F.conv2d(x.detach(), conv.weight, conv.bias, padding=1)
    assert rel(y, want) < 1e-2


@needs_kernel
def test_unet_conv_takes_this_path_only_where_switched_on(monkeypatch):
    seen = []
    real = im2col.product3x3
    monkeypatch.setattr(im2col, "product3x3", lambda *a: seen.append(1) or real(*a))
    conv = Conv2d(1280, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 1280, 4, 4)  # 16 pixels, 1280 channels: the one-product path
    with torch.no_grad():
        on = conv(x)
        with fastpaths.switched(im2col=False):
            off = conv(x)
    assert len(seen) == 1
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)


def test_build_failure_falls_back_with_a_warning(broken_build):
    """No compiler (or any build error): one warning, then PyTorch's unfold."""
    broken_build(im2col.KERNEL)
    conv = Conv2d(160, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 160, 4, 4)
    with pytest.warns(UserWarning, match="im2col kernel not built.*no compiler here"):
        assert not im2col.usable(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not im2col.usable(x)  # tried once per process
        with torch.no_grad():
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not available"):
        im2col.product3x3(x, conv.weight, conv.bias)


def test_switched_off_by_environment(monkeypatch):
    """SD_LORA_IM2COL=0 starts the process with this switch off: PyTorch's unfold, and the kernel never built."""
    monkeypatch.setenv("SD_LORA_IM2COL", "0")
    assert Switches.from_environment() == Switches(im2col=False)
    monkeypatch.setattr(im2col.KERNEL, "state", "untried")
    monkeypatch.setattr(im2col.KERNEL, "ext", None)
    conv = Conv2d(160, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 160, 4, 4)
    with fastpaths.switched(Switches.from_environment()), torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    assert im2col.KERNEL.state == "untried"


def test_not_for_other_devices_or_dtypes():
    assert not im2col.usable(torch.zeros(1, 8, 4, 4, dtype=torch.float16))
    assert not im2col.usable(torch.zeros(8, 4, 4))
    assert not im2col.usable(torch.zeros(1, 8, 4, 4, device="meta"))

"""Tests for fastpaths/winograd: float32 3x3 convs by Winograd F(4x4, 3x3) against F.conv2d, and when they are used."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastpaths
from fastpaths import Switches, winograd
from fastpaths.layers import Conv2d, WinogradConv2d

needs_kernel = pytest.mark.skipif(winograd.KERNEL.get() is None, reason="Winograd kernel not built on this machine")


@pytest.fixture
def calls(monkeypatch) -> list:
    """One entry per call of winograd.conv3x3 (which still runs)."""
    seen = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: seen.append(1) or real(*a))
    return seen


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_kernel
@pytest.mark.parametrize("n,c,k,h,w", [
    (2, 24, 40, 30, 30),   # sides not a multiple of the 4x4 output tile
    (1, 16, 16, 32, 20),   # multiples
    (3, 5, 7, 9, 13),      # odd everything
    (1, 8, 3, 1, 1),       # one pixel: all padding
])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_conv2d(n, c, k, h, w, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
    b = torch.randn(k, generator=g) if bias else None
    exact = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    direct = F.conv2d(x, weight, b, padding=1)
    ours = winograd.conv3x3(x, weight, b)
    assert ours.shape == exact.shape and ours.dtype == torch.float32
    # F(4x4, 3x3) rounds about 10x more than a direct fp32 conv; bf16 would be near 3e-3
    assert rel_rms(ours, exact) < max(20 * rel_rms(direct, exact), 1e-5)


@needs_kernel
def test_tiles_in_chunks_and_output_channels_in_blocks(monkeypatch):
    """Tiles go in chunks of tile rows and filters in blocks of output channels; short last ones included."""
    monkeypatch.setattr(winograd, "BUDGET_FLOATS", 36 * 24 * 32)  # 32 channels per block (32 + 32 + 6), 5 tile rows
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 24, 17, 23, generator=g), torch.randn(70, 24, 3, 3, generator=g)
    b = torch.randn(70, generator=g)
    exact = F.conv2d(x.double(), weight.double(), b.double(), padding=1)
    assert rel_rms(winograd.conv3x3(x, weight, b), exact) < 1e-5
    narrow = weight[:24]  # one block, its filters transformed once for all chunks
    exact = F.conv2d(x.double(), narrow.double(), b[:24].double(), padding=1)
    assert rel_rms(winograd.conv3x3(x, narrow, b[:24]), exact) < 1e-5


@needs_kernel
def test_backward_gives_the_input_gradient_only():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 19, 26, generator=g, requires_grad=True)
    weight, b = torch.randn(20, 12, 3, 3, generator=g), torch.randn(20, generator=g)
    grad = torch.randn(2, 20, 19, 26, generator=g)
    winograd.conv3x3(x, weight, b).backward(grad)
    exact = torch.nn.grad.conv2d_input(x.shape, weight.double(), grad.double(), padding=1)
    assert rel_rms(x.grad, exact) < 1e-5

    trainable = weight.clone().requires_grad_()
    with pytest.raises(ValueError, match="no weight or bias gradient"):
        winograd.conv3x3(x, trainable, b)
    with torch.no_grad():  # sampling with a model whose weights are being trained elsewhere is fine
        assert rel_rms(winograd.conv3x3(x, trainable, b), F.conv2d(x.double(), weight.double(), b.double(),
                                                                  padding=1)) < 1e-5


def test_usable_only_for_frozen_float32_stride1_same_padding_wide_and_enough_tiles():
    conv = Conv2d(128, 128, 3, padding=1)
    big = torch.zeros(2, 128, 32, 32)  # 2 · 8 · 8 = 128 tiles
    expected = winograd.KERNEL.get() is not None
    assert not winograd.usable(big, conv)  # a trainable weight, autograd on: it needs the library conv's gradient
    with torch.no_grad():
        assert winograd.usable(big, conv) == expected
    conv.requires_grad_(False)
    assert winograd.usable(big, conv) == expected
    assert not winograd.usable(big[:1], conv)                               # 64 tiles: oneDNN is faster
    assert not winograd.usable(big.bfloat16(), conv.to(torch.bfloat16))    # float32 only
    assert not winograd.usable(big, Conv2d(128, 128, 3, stride=2, padding=1).requires_grad_(False))
    assert not winograd.usable(big, Conv2d(128, 128, 1).requires_grad_(False))
    assert not winograd.usable(big, Conv2d(128, 4, 3, padding=1).requires_grad_(False))  # few outputs
    assert not winograd.usable(big[:, :64], Conv2d(64, 128, 3, padding=1).requires_grad_(False))


@needs_kernel
def test_unet_conv_takes_the_winograd_path_when_frozen_or_without_grad(calls, monkeypatch):
    torch.manual_seed(3)
    conv = Conv2d(128, 128, 3, padding=1)
    x = torch.randn(2, 128, 32, 32, requires_grad=True)
    reference = F.conv2d(x.detach().double(), conv.weight.detach().double(), conv.bias.detach().double(), padding=1)

    y = conv(x)  # trainable weight with grad on: the library conv, so the weight gets its gradient
    assert not calls
    y.sum().backward()
    assert conv.weight.grad is not None

    with torch.no_grad():
        assert rel_rms(conv(x), reference) < 1e-5
    assert len(calls) == 1

    conv.requires_grad_(False)
    x.grad = None
    conv(x).sum().backward()
    assert len(calls) == 2 and x.grad is not None

    with fastpaths.switched(winograd_conv=False), torch.no_grad():
        conv(x)
    assert len(calls) == 2


def test_build_failure_falls_back_with_a_warning(broken_build):
    """No compiler (or any build error): one warning, then the library conv."""
    broken_build(winograd.KERNEL)
    conv = Conv2d(128, 128, 3, padding=1).requires_grad_(False)
    x = torch.zeros(2, 128, 32, 32)
    with pytest.warns(UserWarning, match="Winograd conv kernel not built.*no compiler here"):
        assert not winograd.usable(x, conv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not winograd.usable(x, conv)  # tried once per process
        with torch.no_grad():
            assert conv(x).shape == x.shape


def test_switched_off_by_environment(monkeypatch):
    """SD_LORA_WINOGRAD=0 starts the process with this switch off: the library conv, and the kernel never built."""
    monkeypatch.setenv("SD_LORA_WINOGRAD", "0")
    assert Switches.from_environment() == Switches(winograd_conv=False)
    monkeypatch.setattr(winograd.KERNEL, "state", "untried")  # forget this process's outcome
    monkeypatch.setattr(winograd.KERNEL, "ext", None)
    frozen = Conv2d(128, 128, 3, padding=1).requires_grad_(False)
    with warnings.catch_warnings(), fastpaths.switched(Switches.from_environment()), torch.no_grad():
        warnings.simplefilter("error")
        assert frozen(torch.zeros(2, 128, 32, 32)).shape == (2, 128, 32, 32)  # the library conv
    assert winograd.KERNEL.state == "untried"


@needs_kernel
def test_vae_convs_take_the_winograd_path(calls, monkeypatch):
    torch.manual_seed(4)
    conv = WinogradConv2d(128, 128, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 128, 48, 48)  # 144 tiles
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert rel_rms(conv(x), exact) < 1e-5 and len(calls) == 1
    with fastpaths.switched(winograd_conv=False):
        assert rel_rms(conv(x), exact) < 1e-6 and len(calls) == 1

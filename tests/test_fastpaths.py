"""fastpaths.apply: the fast layers swap in place, keep every parameter and key, and compute what the model computes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fastpaths
import lora
import sd
from fastpaths import SWITCHES, Switches, layers
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict
from unet import UNetModel
from vae import AutoencoderKL, VAEConfig

from helpers import RICH, randomize, randomize_lora

SD1_RICH = dataclasses.replace(RICH, use_linear_in_transformer=False)  # SD1's 1x1-conv projections
ALL_OFF = {f.name: False for f in dataclasses.fields(Switches)}


def test_apply_swaps_layers_in_place_and_keeps_every_parameter_and_key():
    unet = randomize(UNetModel(SD1_RICH))
    before = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    convs = [m for m in unet.modules() if isinstance(m, nn.Conv2d)]
    assert fastpaths.apply(unet) is unet
    assert {k: v.data_ptr() for k, v in unet.state_dict().items()} == before
    assert [m for m in unet.modules() if isinstance(m, nn.Conv2d)] == convs  # the same objects
    assert all(type(m) is layers.Conv2d for m in convs)
    kinds = {type(m) for m in unet.modules()}
    assert {layers.CrossAttention, layers.GEGLU, layers.SpatialTransformer} <= kinds
    vae = fastpaths.apply(AutoencoderKL(VAEConfig.tiny()))
    assert all(type(m) is layers.WinogradConv2d for m in vae.modules() if isinstance(m, nn.Conv2d))
    assert fastpaths.apply(unet) is unet and type(convs[0]) is layers.Conv2d  # twice changes nothing


@pytest.mark.parametrize("switches", [{}, ALL_OFF])
def test_fast_layers_compute_what_the_architecture_computes(switches):
    """Forward and LoRA gradients as the plain model gives them; with every switch off, to the bit."""
    plain, fast = (randomize(UNetModel(SD1_RICH)) for _ in range(2))
    fastpaths.apply(fast)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, SD1_RICH.context_dim, generator=g)

    def run(unet):
        lora.inject(unet, 2, 2, "all")
        randomize_lora(unet)
        y = unet(x, torch.tensor([10, 700]), c)
        y.square().mean().backward()
        return [y.detach()] + [p.grad for p in lora.lora_parameters(unet)]

    want = run(plain)
    with fastpaths.switched(**switches):
        got = run(fast)
    for a, b in zip(got, want):
        if switches:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 rounding of other kernels


def test_sd_load_applies_the_fast_paths_unless_told_not_to(tmp_path):
    path = write_state_dict(tmp_path / "tiny.safetensors", tiny_state_dict("sd1"))
    fast, plain = sd.load(path), sd.load(path, fast_paths=False)
    assert type(fast.unet.out[2]) is layers.Conv2d and type(fast.vae.decoder.conv_out) is layers.WinogradConv2d
    assert type(plain.unet.out[2]) is nn.Conv2d and type(plain.vae.decoder.conv_out) is nn.Conv2d
    assert fast.state_dict().keys() == plain.state_dict().keys()


def test_switched_sets_the_switches_for_a_block_and_puts_them_back():
    before = dataclasses.replace(SWITCHES)
    with fastpaths.switched(winograd_conv=False, im2col=False) as now:
        assert now is SWITCHES and not SWITCHES.winograd_conv and not SWITCHES.im2col
        with fastpaths.switched(Switches(matmul_conv=False)):
            assert not SWITCHES.matmul_conv and SWITCHES.winograd_conv
        assert SWITCHES.matmul_conv and not SWITCHES.winograd_conv
    assert SWITCHES == before
    with pytest.raises(TypeError):
        with fastpaths.switched(no_such_path=False):
            pass
    assert SWITCHES == before

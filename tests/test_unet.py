"""Tests for unet/: checkpoint-key layout, config inference, parity with diffusers, bf16 and checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from unet import UNetConfig, UNetModel, timestep_embedding, tiny

# A deeper variant: a level without attention, depth 2, two res blocks, multi-head linear attention.
RICH = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(False, True, True),
                  transformer_depth=(0, 2, 1), transformer_depth_middle=1, context_dim=48, num_heads=None,
                  head_dim=64, use_linear_in_transformer=True)
CONFIGS = {"sd1": UNetConfig.tiny_sd1(), "sd2": UNetConfig.tiny_sd2(), "rich": RICH}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero random weights everywhere (zero-init output convs would hide wiring bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and name == "weight":
                    p.copy_(1 + 0.1 * noise)
                elif p.ndim == 1:
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / p[0].numel() ** 0.5)
    return model


def inputs(cfg: UNetConfig, batch: int = 2, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([17.0, 901.0][:batch])
    context = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return x, t, context


# ---------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(name):
    cfg = CONFIGS[name]
    model = randomize(UNetModel(cfg))
    sd = model.state_dict()
    assert UNetConfig.from_state_dict(sd) == cfg
    fresh = UNetModel(UNetConfig.from_state_dict(sd))
    fresh.load_state_dict(sd, strict=True)
    x, t, c = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, c), model(x, t, c), rtol=0, atol=0)


def test_tiny_helper():
    assert tiny("sd1").cfg == UNetConfig.tiny_sd1()
    assert tiny("sd2").cfg == UNetConfig.tiny_sd2()
    a, b = tiny("sd1", seed=5).state_dict(), tiny("sd1", seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["out.2.weight"].abs().sum() > 0  # default init, not the original's zero-init output conv
    with pytest.raises(ValueError, match="unknown family"):
        tiny("sd3")


@pytest.mark.parametrize("preset, params, tensors", [
    ("sd1", 859_520_964, 686),
    ("sd2", 865_910_724, 686),
    ("sdxl", 2_567_463_684, 1680),
])
def test_full_size_on_meta(preset, params, tensors):
    cfg = getattr(UNetConfig, preset)()
    with torch.device("meta"):
        model = UNetModel(cfg)
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(sd) == tensors
    assert not list(model.buffers())  # nothing outside the checkpoint, so strict loading works
    assert UNetConfig.from_state_dict(sd) == cfg
    if preset != "sdxl":
        for key in ["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "middle_block.1.proj_in.weight",
                    "output_blocks.11.0.skip_connection.weight", "out.2.weight", "input_blocks.3.0.op.weight",
                    "output_blocks.2.1.conv.weight", "time_embed.2.weight",
                    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias"]:
            assert key in sd, key
        proj_ndim = 2 if preset == "sd2" else 4
        assert sd["middle_block.1.proj_in.weight"].ndim == proj_ndim
    else:
        assert sd["label_emb.0.0.weight"].shape == (1280, 2816)


def test_load_assign_from_meta():
    cfg = UNetConfig.tiny_sd2()
    sd = randomize(UNetModel(cfg)).state_dict()
    with torch.device("meta"):
        model = UNetModel(UNetConfig.from_state_dict(sd))
    model.load_state_dict(sd, strict=True, assign=True)
    x, t, c = inputs(cfg)
    assert torch.isfinite(model(x, t, c)).all()


# ---------------------------------------------------------------------------------------- config inference errors


def test_from_state_dict_rejects_non_unet():
    with pytest.raises(ValueError, match="not an LDM UNet") as err:
        UNetConfig.from_state_dict({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1)})
    assert "encoder.conv_in.weight" in str(err.value)


def test_from_state_dict_hints_at_prefix():
    sd = {"model.diffusion_model." + k: v for k, v in UNetModel(UNetConfig.tiny_sd1()).state_dict().items()}
    with pytest.raises(ValueError, match="strip the 'model.diffusion_model.' prefix"):
        UNetConfig.from_state_dict(sd)


def test_from_state_dict_rejects_partial_attention():
    sd = UNetModel(dataclasses.replace(UNetConfig.tiny_sd1(), num_res_blocks=2)).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("input_blocks.2.1.")}
    with pytest.raises(ValueError, match="attention present on only some blocks"):
        UNetConfig.from_state_dict(sd)


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="divisible by 32"):
        UNetConfig(model_channels=24)
    with pytest.raises(ValueError, match="levels"):
        UNetConfig(channel_mult=(1, 2))
    # Depth at a level without attention is normalised away, so equal models have equal configs.
    assert UNetConfig(transformer_depth=(1, 1, 1, 1)) == UNetConfig.sd1()


# ---------------------------------------------------------------------------------------- numerics


def test_timestep_embedding_layout():
    t = torch.tensor([0.0, 3.0, 500.0])
    emb = timestep_embedding(t, 8)
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(emb[:, :4], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 4:], torch.sin(t[:, None] * freqs))


def diffusers_reference(cfg: UNetConfig, ldm_sd: dict[str, torch.Tensor]):
    """Convert with diffusers' own single-file code path and load into UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    ds = 2 ** (len(cfg.channel_mult) - 1)
    params = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
        attention_resolutions=[2**i for i, a in enumerate(cfg.attention_levels) if a],
        num_res_blocks=cfg.num_res_blocks, channel_mult=list(cfg.channel_mult),
        transformer_depth=list(cfg.transformer_depth), context_dim=cfg.context_dim,
        use_linear_in_transformer=cfg.use_linear_in_transformer, use_spatial_transformer=True,
    )
    if cfg.num_heads is not None:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.head_dim
    original = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1] * (ds.bit_length())}}},
    }}}
    checkpoint = {"model.diffusion_model." + k: v for k, v in ldm_sd.items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    if cfg.head_dim is not None and cfg.model_channels < cfg.head_dim:
        # diffusers computes model_channels // 64 == 0 heads here; our rule keeps at least one head per level.
        config["attention_head_dim"] = [max(1, c // cfg.head_dim) for c in cfg.level_channels]
    # diffusers' legacy naming: in this config "attention_head_dim" holds head *counts*.
    config["transformer_layers_per_block"] = [max(1, d) for d in cfg.transformer_depth]
    model = UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    cfg = CONFIGS[name]
    assert cfg.transformer_depth_middle == cfg.transformer_depth[-1]  # diffusers ties middle depth to the last level
    ours = randomize(UNetModel(cfg), seed=3).eval()
    ref = diffusers_reference(cfg, ours.state_dict())
    x, t, c = inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, c)
        want = ref(x, t, encoder_hidden_states=c).sample
    assert got.shape == want.shape == x.shape
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, rel
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero outputs


def test_norm_epsilons():
    # Too small to show up in the parity tolerance, so checked directly: 1e-6 only in the transformer GroupNorm.
    model = tiny("sd1")
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    assert {e for n, e in eps.items() if n.endswith(".norm")} == {1e-6}
    assert {e for n, e in eps.items() if not n.endswith(".norm")} == {1e-5}
    assert "middle_block.1.norm" in eps and "out.0" in eps and "input_blocks.1.1.transformer_blocks.0.norm3" in eps


def test_scalar_and_integer_timesteps():
    model = tiny("sd2").eval()
    x, _, c = inputs(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 500, c), model(x, torch.tensor([500.0, 500.0]), c))


def test_sdxl_style_label_embedding():
    cfg = dataclasses.replace(UNetConfig.tiny_sd2(), adm_in_channels=12)
    model = randomize(UNetModel(cfg))
    assert UNetConfig.from_state_dict(model.state_dict()) == cfg
    x, t, c = inputs(cfg)
    y = torch.randn(2, 12)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, c, y), model(x, t, c, torch.zeros_like(y)))
    with pytest.raises(ValueError, match="y must be given"):
        model(x, t, c)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_bf16_close_to_fp32(name):
    cfg = CONFIGS[name]
    model = randomize(UNetModel(cfg)).eval()
    x, t, c = inputs(cfg)
    with torch.no_grad():
        want = model(x, t, c)
        model.to(torch.bfloat16)
        got = model(x.bfloat16(), t, c.bfloat16())
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert rel < 0.05, rel


@pytest.mark.parametrize("min_pixels", [0, 100])
def test_gradient_checkpointing_same_grads(monkeypatch, min_pixels):
    """Same gradients with and without checkpointing; blocks over fewer than checkpoint_min_pixels latent pixels
    are not checkpointed (0: all are; 100: on 16x16 latents only the 16x16 level is)."""
    from unet import model as unet_model

    calls = []
    real = unet_model.checkpoint
    monkeypatch.setattr(unet_model, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    cfg = UNetConfig.tiny_sd1()
    model = randomize(UNetModel(cfg)).train()
    model.checkpoint_min_pixels = min_pixels
    x, t, c = inputs(cfg)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(x, t, c).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads(False)
    assert not calls
    ckpt = grads(True)
    blocks = [m for m in model.modules() if isinstance(m, (unet_model.ResBlock, unet_model.BasicTransformerBlock))]
    if min_pixels == 0:
        assert len(calls) == len(blocks)
    else:
        assert 0 < len(calls) < len(blocks)  # the deeper levels (8x8 and below) kept their activations
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_latent_sides_that_do_not_halve_evenly_match_diffusers():
    """SD sizes are multiples of 8 pixels, so latents need not halve evenly (65 -> 33 -> 17): upsampling
    follows the skip's size, as diffusers does."""
    cfg = RICH
    ours = randomize(UNetModel(cfg), seed=4).eval()
    ref = diffusers_reference(cfg, ours.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, cfg.in_channels, 9, 13, generator=g)
    c = torch.randn(1, 7, cfg.context_dim, generator=g)
    with torch.no_grad():
        got, want = ours(x, torch.tensor([500.0]), c), ref(x, torch.tensor([500.0]), encoder_hidden_states=c).sample
    assert got.shape == x.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("kernel,batch,size", [(3, 1, (4, 4)), (3, 2, (2, 4)), (1, 2, (4, 2)), (3, 1, (3, 5)),
                                               (1, 1, (16, 12)), (1, 3, (16, 12))])
def test_few_pixel_conv_as_matmul_equals_conv2d(kernel, batch, size):
    """fastpaths.layers.Conv2d runs small-spatial CPU convs (and every 1x1 conv) as unfold + matmul: same outputs
    and gradients as F.conv2d."""
    from fastpaths.layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(160, 24, kernel, padding=kernel // 2)
    assert conv._matmul_ok and (kernel == 1 or batch * size[0] * size[1] * 10 <= conv.in_channels)  # matmul path
    x0 = torch.randn(batch, 160, *size)

    def run(fn, dtype=None):
        x = x0.clone().requires_grad_(True)
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            y = fn(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads = (x.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
        conv.zero_grad()
        return (y.detach(),) + grads

    reference = lambda x: nn.functional.conv2d(x, conv.weight, conv.bias, padding=kernel // 2)  # noqa: E731
    for got, want in zip(run(conv), run(reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(run(conv, torch.bfloat16), run(reference, torch.bfloat16)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=0.03, atol=0.03)
    strided = Conv2d(160, 24, 3, stride=2, padding=1)
    assert not strided._matmul_ok  # the downsampler keeps the library conv


@pytest.mark.parametrize("wrapped", [False, True])
def test_sd1_projections_per_token_equal_the_1x1_convs(wrapped):
    """SD1's proj_in/proj_out 1x1 convs run as per-token linear maps (no layout copies): same outputs and input
    gradients as the convs; with a LoRA wrapper on them, the wrapper's own path runs and its update counts."""
    import fastpaths
    import lora
    from tests.helpers import RICH, randomize, randomize_lora

    cfg = dataclasses.replace(RICH, use_linear_in_transformer=False)
    unet = fastpaths.apply(randomize(UNetModel(cfg)))
    if wrapped:
        assert len(lora.inject(unet, 2, 2, ["*.proj_in", "*.proj_out"])) == 22  # 11 transformers
        randomize_lora(unet)
    x0, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, cfg.context_dim)

    def run(pointwise: bool):
        x = x0.clone().requires_grad_(True)
        with fastpaths.switched(pointwise_proj=pointwise):
            y = unet(x, torch.tensor([10, 700]), c)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), x.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if wrapped:
        with_lora = run(True)[0]
        for layer in lora.lora_layers(unet):
            layer.multiplier = 0.0
        assert not torch.allclose(run(True)[0], with_lora)  # the LoRA on proj_in/proj_out was applied


@pytest.mark.parametrize("stride,autocast", [(1, False), (2, False), (1, True)])
def test_frozen_conv_keeps_no_input_and_gives_the_same_input_gradient(stride, autocast):
    """A conv with a frozen weight (LoRA training) saves only its weight for backward; the gradient is unchanged."""
    from fastpaths.layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(8, 12, 3, stride=stride, padding=1).requires_grad_(False)
    x0 = torch.randn(2, 8, 12, 10)

    def run(fn):
        x = x0.clone().requires_grad_(True)
        saved = []
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return y.detach(), x.grad, saved

    y, g, saved = run(conv)
    y_ref, g_ref, _ = run(lambda x: nn.functional.conv2d(x, conv.weight, conv.bias, stride, 1))
    assert [t.shape for t in saved] == [conv.weight.shape]
    assert y.dtype == y_ref.dtype and g.dtype == g_ref.dtype == torch.float32
    tol = dict(rtol=0.02, atol=0.02) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(g, g_ref, **tol)


def test_conv_with_trainable_bias_still_gets_its_gradient():
    from fastpaths.layers import Conv2d

    conv = Conv2d(4, 6, 3, padding=1)
    conv.weight.requires_grad_(False)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv(x).square().sum().backward()
    assert conv.bias.grad is not None and conv.bias.grad.abs().max() > 0

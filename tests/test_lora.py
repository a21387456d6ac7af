"""Tests for lora/ layers, injection and naming: the math, merging, freezing, counts, and sd-scripts' names."""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch
from torch import nn

import lora
from lora.names import kohya_name, unet_to_diffusers
from text import ClipLConfig, ClipLTextEncoder, OpenClipConfig, OpenClipTextEncoder
from unet import UNetConfig, UNetModel

from helpers import BASES, RICH, base_input, randomize, randomize_lora


def unet_inputs(cfg: UNetConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.in_channels, 8, 8, generator=g), torch.tensor([10.0, 700.0]),
            torch.randn(2, 5, cfg.context_dim, generator=g))


def tiny_unet(cfg: UNetConfig = UNetConfig.tiny_sd1(), seed: int = 0) -> UNetModel:
    return randomize(UNetModel(cfg), seed).eval()




# ---------------------------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa"])
def test_step0_output_equals_base(kind, init):
    torch.manual_seed(0)
    base = BASES[kind]()
    x = base_input(base)
    with torch.no_grad():
        want = base(x).clone()
        layer = lora.wrap(base, rank=4, alpha=8, init=init)
        got = layer(x)
    atol = 1e-5 if init == "pissa" else 0  # PiSSA moves the top singular part out of W0 and back: rounding only
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    if init == "pissa":
        assert layer.lora_up.weight.abs().max() > 0  # the factors really carry the top singular part
    else:
        assert torch.count_nonzero(layer.lora_up.weight) == 0 and torch.count_nonzero(layer.lora_down.weight) > 0


def test_init_statistics():
    base = nn.Linear(512, 512)
    torch.manual_seed(0)
    g = lora.LoRALinear(base, rank=8, init="gaussian")
    assert abs(g.lora_down.weight.std().item() - 1 / 8) < 0.01
    k = lora.LoRALinear(nn.Linear(512, 512), rank=8, init="kaiming")
    # kaiming_uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), the nn.Linear default.
    assert k.lora_down.weight.abs().max() <= 1 / math.sqrt(512) + 1e-7
    with pytest.raises(ValueError, match="unknown LoRA init"):
        lora.LoRALinear(nn.Linear(4, 4), rank=2, init="orthogonal")


def test_pissa_factors_are_top_singular_part():
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    w0 = base.weight.detach().clone()
    layer = lora.LoRALinear(base, rank=4, alpha=2, init="pissa")
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.scale * layer.lora_up.weight @ layer.lora_down.weight, top, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.weight, w0 - top, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("rs", [False, True])
def test_forward_is_w0x_plus_scaled_bax(kind, rs):
    torch.manual_seed(0)
    base = BASES[kind]()
    x = base_input(base)
    layer = lora.wrap(base, rank=4, alpha=3, rs=rs, multiplier=0.7)
    randomize_lora(layer)
    s = 3 / (math.sqrt(4) if rs else 4)
    assert layer.scale == pytest.approx(s)
    with torch.no_grad():
        if isinstance(base, nn.Linear):
            want = base(x) + 0.7 * s * (x @ layer.lora_down.weight.T @ layer.lora_up.weight.T)
        else:
            kernel = layer.lora_weight(1.0)  # B·A as one conv kernel
            want = base(x) + 0.7 * s * nn.functional.conv2d(x, kernel, None, base.stride, base.padding)
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        layer.multiplier = 0.0
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(BASES))
def test_merge_then_unmerge_restores_weights(kind):
    torch.manual_seed(0)
    base = BASES[kind]()
    x = base_input(base)
    w0 = base.weight.detach().clone()
    layer = lora.wrap(base, rank=4, alpha=2, multiplier=1.3)
    randomize_lora(layer)
    with torch.no_grad():
        live = layer(x)
        layer.merge()
        assert layer.merged and not torch.equal(base.weight, w0)
        layer.merge()  # a second merge is a no-op, not a double add
        merged = layer(x)
        layer.eval(), layer.train()  # merging is explicit, never tied to train/eval
        assert layer.merged
        layer.multiplier = 5.0  # unmerge removes what merge added, whatever the multiplier is now
        layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(merged, live, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_half_precision_base_with_float32_factors():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = lora.LoRALinear(base, rank=2, dtype=torch.float32)
    randomize_lora(layer)
    y = layer(torch.randn(4, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.lora_down.weight.dtype == torch.float32


def _out_of_place(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's formula written without in-place ops, recursing through stacked LoRAs (add with alpha, as
    forward's add_, so that the two round alike in half precision)."""
    if not isinstance(layer, (lora.LoRALinear, lora.LoRAConv)):
        return layer(x)
    y = _out_of_place(layer.base, x)
    if layer.merged or layer.multiplier == 0.0:
        return y
    h = layer.lora_down(x.to(layer.lora_down.weight.dtype))
    return torch.add(y, layer.lora_up(h).to(y.dtype), alpha=layer.multiplier * layer.scale)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
@pytest.mark.parametrize("mode", ["fp32", "fp32-x-frozen", "bf16-base", "fp16-base", "autocast-bf16",
                                  "checkpoint", "stacked", "merged"])
def test_inplace_add_gives_the_out_of_place_gradients(kind, mode):
    # forward() adds the LoRA branch into the base output in place; autograd must see the same graph as y + s·BAx.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    base_dtype = {"bf16-base": torch.bfloat16, "fp16-base": torch.float16}.get(mode, torch.float32)
    base = BASES[kind]().to(base_dtype).requires_grad_(False)
    layer = lora.wrap(base, rank=4, alpha=3, multiplier=0.7, dtype=torch.float32)
    if mode == "stacked":
        layer = lora.wrap(layer, rank=2, alpha=2, multiplier=1.3, name="b", dtype=torch.float32)
    randomize_lora(layer)
    if mode == "merged":
        layer.merge()
    x0 = base_input(base).to(base_dtype)

    def run(fn):
        x = x0.clone().requires_grad_(mode != "fp32-x-frozen")
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast-bf16" else contextlib.nullcontext()
        with ctx:
            y = checkpoint(fn, x, use_reentrant=False) if mode == "checkpoint" else fn(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        params = [p for p in layer.parameters() if p.requires_grad]
        grads = [p.grad.clone() if p.grad is not None else None for p in params]
        for p in params:
            p.grad = None
        return y.detach(), x.grad, grads

    got, want = run(layer), run(lambda x: _out_of_place(layer, x))
    tol = dict(atol=1e-5, rtol=1e-5) if base_dtype == torch.float32 and mode != "autocast-bf16" else {}
    torch.testing.assert_close(got[0], want[0], **tol)
    if mode == "fp32-x-frozen":
        assert got[1] is None and want[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], **tol)
    for g, w in zip(got[2], want[2]):
        if mode == "merged":  # the update lives in W0: the factors are off the graph
            assert g is None and w is None
        else:
            assert g is not None and g.abs().max() > 0
            torch.testing.assert_close(g, w, **tol)


def test_layer_rejects_bad_input():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d"):
        lora.wrap(nn.LayerNorm(4), rank=2)
    with pytest.raises(ValueError, match="groups=1"):
        lora.LoRAConv(nn.Conv2d(4, 4, 3, groups=2), rank=2)


# ------------------------------------------------------------------------------------------- injection

def test_inject_keeps_paths_and_trains_only_a_and_b():
    model = tiny_unet()
    paths = lora.inject(model, rank=4, alpha=4, targets="attn-mlp")
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in paths
    assert isinstance(model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q"), lora.LoRALinear)
    assert isinstance(model.get_submodule("input_blocks.1.1.proj_in"), lora.LoRAConv)  # SD1: a 1x1 conv
    randomize_lora(model)
    x, t, c = unet_inputs(model.cfg)
    model(x, t, c).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert trainable and all(re.search(r"\.lora_(down|up)\.weight$", n) for n in trainable)
    assert len(trainable) == 2 * len(paths)


@pytest.mark.parametrize("preset,layers", [("attn", 128), ("attn-mlp", 192), ("all", 278)])
def test_counts_on_full_size_sd15_on_meta(preset, layers):
    with torch.device("meta"):
        model = UNetModel(UNetConfig.sd1())
    paths = lora.inject(model, rank=4, alpha=4, targets=preset)
    assert len(paths) == layers
    n = sum(p.numel() for p in lora.lora_parameters(model))
    if preset == "attn":
        assert n == 797_184  # diffusers' default SD1.5 LoRA at rank 4
    # r·(d+k) per layer, the formula of the paper
    want = sum(4 * (w.shape[0] + w[0].numel()) for w in (model.get_submodule(p).weight for p in paths))
    assert n == want
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n


def test_report_shows_blocks_and_totals():
    with torch.device("meta"):
        model = UNetModel(UNetConfig.sd1())
    lora.inject(model, rank=4, targets="attn")
    text = lora.report(model)
    assert "input_blocks.1" in text and "middle_block.1" in text and "output_blocks.11" in text
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert "128" in total and "797,184" in total
    assert "d*k" in text and "r*(d+k)" in text


def test_patterns_and_overrides():
    model = tiny_unet()
    paths = lora.inject(model, rank=4, targets=["*.attn2.to_k", "re:.*attn1\\.to_(q|v)"],
                        rank_overrides={"output_blocks.*": 2, "middle_block.*to_v": 0},
                        alpha_overrides={"re:input_blocks\\.1\\..*": 1.0})
    assert all(re.search(r"attn2\.to_k$|attn1\.to_[qv]$", p) for p in paths)
    assert "middle_block.1.transformer_blocks.0.attn1.to_v" not in paths  # rank 0 skips
    assert "middle_block.1.transformer_blocks.0.attn1.to_q" in paths
    get = model.get_submodule
    assert get("output_blocks.2.1.transformer_blocks.0.attn2.to_k").rank == 2
    assert get("input_blocks.1.1.transformer_blocks.0.attn2.to_k").alpha == 1.0
    assert get("input_blocks.3.1.transformer_blocks.0.attn2.to_k").alpha == 4.0  # alpha None -> rank


def test_conv_rank_for_big_kernels_only():
    model = tiny_unet()
    lora.inject(model, rank=4, alpha=4, targets="all", conv_rank=8, conv_alpha=1)
    assert model.get_submodule("input_blocks.1.0.in_layers.2").rank == 8
    assert model.get_submodule("input_blocks.1.0.in_layers.2").alpha == 1
    assert model.get_submodule("input_blocks.1.0.emb_layers.1").rank == 4  # a Linear in the ResBlock
    assert model.get_submodule("input_blocks.1.1.proj_in").rank == 4  # 1x1 conv


def test_inject_no_match_is_an_error():
    with pytest.raises(ValueError, match="no Linear/Conv2d module matches"):
        lora.inject(tiny_unet(), targets=["*.nothing_here"])


def test_text_encoder_targets():
    te = ClipLTextEncoder(ClipLConfig.tiny())
    paths = lora.inject(te, rank=2, targets="attn-mlp")
    layers = te.config.layers
    assert len(paths) == 6 * layers
    assert "transformer.text_model.encoder.layers.0.self_attn.q_proj" in paths
    assert "transformer.text_model.encoder.layers.0.mlp.fc2" in paths
    open_clip = OpenClipTextEncoder(OpenClipConfig.tiny())
    paths = lora.inject(open_clip, rank=2, targets="attn-mlp")
    # OpenCLIP packs q, k, v in one tensor: the attention itself takes a packed q/k/v LoRA, beside out_proj and the MLP.
    assert len(paths) == 4 * open_clip.config.layers
    assert "model.transformer.resblocks.0.attn.out_proj" in paths and "model.transformer.resblocks.0.attn" in paths


def test_stacked_adapters_and_multipliers():
    model = tiny_unet()
    x, t, c = unet_inputs(model.cfg)
    with torch.no_grad():
        base_out = model(x, t, c)
    lora.inject(model, rank=2, targets="attn", name="a")
    lora.inject(model, rank=3, targets="attn", name="b")
    randomize_lora(model)
    layer = model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    assert layer.name == "b" and layer.base.name == "a" and isinstance(layer.base.base, nn.Linear)
    with torch.no_grad():
        both = model(x, t, c)
        lora.set_multiplier(model, 0.0, name="b")
        only_a = model(x, t, c)
        lora.set_multiplier(model, 0.0)
        torch.testing.assert_close(model(x, t, c), base_out, atol=0, rtol=0)
        lora.set_multiplier(model, 1.0)
        lora.merge(model, name="a")
        torch.testing.assert_close(model(x, t, c), both, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="unmerge"):
            lora.set_multiplier(model, 0.5, name="a")
        lora.remove(model, name="b")
        torch.testing.assert_close(model(x, t, c), only_a, atol=1e-5, rtol=1e-5)
    assert not (both - only_a).abs().max() < 1e-4


def test_merged_state_dict_is_a_checkpoint_of_what_the_model_computes(tmp_path):
    """sd knows nothing of LoRA: lora.merged_state_dict gives a StableDiffusion's weights with every LoRA folded in,
    under the checkpoint's keys, and leaves the model as it is."""
    import sd
    from sd.checkpoint import write_state_dict
    from sd.tiny import tiny_state_dict

    model = sd.load(write_state_dict(tmp_path / "base.safetensors", tiny_state_dict("sd1")))
    lora.inject(model.unet, rank=2, targets="all")
    randomize_lora(model.unet)
    x, t, c = unet_inputs(model.unet.cfg)
    c = torch.randn(2, 5, model.unet.cfg.context_dim)
    with torch.no_grad():
        want = model.unet(x, t, c)
    tensors = lora.merged_state_dict(model)
    assert tensors.keys() == tiny_state_dict("sd1").keys()
    assert lora.lora_layers(model.unet)  # still there
    again = sd.load(model.save(tmp_path / "merged.safetensors", tensors=tensors))
    with torch.no_grad():
        torch.testing.assert_close(again.unet(x, t, c), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
@pytest.mark.parametrize("merged", [False, True])
def test_base_state_dict_and_remove(init, merged):
    model = tiny_unet()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, c = unet_inputs(model.cfg)
    lora.inject(model, rank=2, targets="all", init=init)
    if init == "kaiming":
        randomize_lora(model)
    else:
        with torch.no_grad():  # a training step's worth of change, so the PiSSA factors differ from their start
            for p in lora.lora_parameters(model):
                p.add_(0.01 * torch.randn_like(p))
    with torch.no_grad():
        want = model(x, t, c)
    if merged:
        lora.merge(model)
    assert any(".base." in k for k in model.state_dict())
    sd = lora.base_state_dict(model)
    assert sd.keys() == original.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], original[k], atol=1e-5, rtol=0)
    folded = lora.base_state_dict(model, merged=True)
    plain = UNetModel(model.cfg).eval()
    plain.load_state_dict(folded, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, c), want, atol=1e-4, rtol=1e-4)
    n_layers = len(lora.lora_layers(model))
    removed = lora.remove(model)  # the layers go, the base weights come back (unmerged, PiSSA residual undone)
    assert len(removed) == n_layers and not lora.lora_layers(model)
    after = model.state_dict()
    assert after.keys() == original.keys()
    for k, v in after.items():
        torch.testing.assert_close(v, original[k], atol=1e-5, rtol=0)


def test_remove_with_merge_keeps_the_update():
    model = tiny_unet()
    x, t, c = unet_inputs(model.cfg)
    lora.inject(model, rank=2, targets="attn-mlp")
    randomize_lora(model)
    with torch.no_grad():
        want = model(x, t, c)
    lora.remove(model, merge=True)
    assert not lora.lora_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, c), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- names

def test_issue_examples():
    n = UNetConfig.sd1().num_res_blocks
    assert kohya_name("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "unet", n) == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_name("middle_block.1.proj_in", "unet", n) == "lora_unet_mid_block_attentions_0_proj_in"
    assert kohya_name("output_blocks.11.1.transformer_blocks.0.ff.net.0.proj", "unet", n) == \
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"
    assert kohya_name("transformer.text_model.encoder.layers.0.self_attn.q_proj", "te") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name("model.transformer.resblocks.3.mlp.c_fc", "te") == "lora_te_text_model_encoder_layers_3_mlp_fc1"
    assert unet_to_diffusers("input_blocks.3.0.op", n) == "down_blocks.0.downsamplers.0.conv"
    assert unet_to_diffusers("output_blocks.2.1.conv", n) == "up_blocks.0.upsamplers.0.conv"
    assert unet_to_diffusers("output_blocks.5.2.conv", n) == "up_blocks.1.upsamplers.0.conv"
    assert unet_to_diffusers("output_blocks.4.0.skip_connection", n) == "up_blocks.1.resnets.1.conv_shortcut"
    assert unet_to_diffusers("middle_block.2.emb_layers.1", n) == "mid_block.resnets.1.time_emb_proj"
    with pytest.raises(ValueError, match="cannot map"):
        unet_to_diffusers("input_blocks.1.7.foo", n)

"""Tests for lora/io.py: round trips per format, diffusers reading our kohya files, other tools' files, bad files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora
from lora.names import kohya_name, unet_to_diffusers
from text import ClipLConfig, ClipLTextEncoder, OpenClipConfig, OpenClipTextEncoder
from unet import UNetConfig, UNetModel

from helpers import RICH, randomize, randomize_lora

SD1 = UNetConfig.tiny_sd1()
SD2 = UNetConfig.tiny_sd2()


def unet(cfg: UNetConfig = SD1, seed: int = 0) -> UNetModel:
    return randomize(UNetModel(cfg), seed).eval()


def inputs(cfg: UNetConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.in_channels, 8, 8, generator=g), torch.tensor([10.0, 700.0]),
            torch.randn(2, 5, cfg.context_dim, generator=g))


def run(model: UNetModel) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(model.cfg))


def trained(cfg: UNetConfig = SD1, targets="attn-mlp", **kw) -> UNetModel:
    model = unet(cfg)
    lora.inject(model, targets=targets, **{"rank": 4, "alpha": 2.0, **kw})
    randomize_lora(model)
    return model


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("targets", ["attn", "all"])
def test_round_trip(tmp_path, fmt, targets):
    model = trained(targets=targets)
    want = run(model)
    path = tmp_path / "x.safetensors"
    lora.save(path, model, format=fmt)
    fresh = unet()
    info = lora.load(path, fresh)
    assert info.format == fmt and len(info.modules) == len(lora.lora_layers(model))
    close(run(fresh), want)
    assert not any(p.requires_grad for p in lora.lora_parameters(fresh))  # loaded LoRAs are for inference


def test_resume_training_from_a_file(tmp_path):
    model = trained(targets="attn")
    lora.save(tmp_path / "step100.safetensors", model, dtype=torch.float16)
    fresh = unet()
    lora.load(tmp_path / "step100.safetensors", fresh, name="default", trainable=True, dtype=torch.float32)
    params = lora.lora_parameters(fresh)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" not in n)
    close(run(fresh), run(model), 1e-2)  # the file was written in float16


def test_kohya_file_layout_and_metadata(tmp_path):
    model = trained(targets="all", conv_rank=8, conv_alpha=1.0)
    path = tmp_path / "x.safetensors"
    lora.save(path, model, metadata={"ss_training_config": {"lr": 1e-4, "steps": 10}, "note": "hi"})
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_1_proj_out.lora_up.weight" in keys
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in keys
    assert alpha.ndim == 0 and alpha.item() == 2.0
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "1"}
    assert json.loads(meta["ss_training_config"]) == {"lr": 1e-4, "steps": 10} and meta["note"] == "hi"
    assert meta["lora_scaling"] == "alpha/r"
    assert not [p for p in os.listdir(tmp_path) if p != "x.safetensors"]  # the temp file is gone
    lora.save(path, model)  # overwriting works (os.replace)


def test_rank_stabilised_scale_is_stored(tmp_path):
    model = trained(rank=16, alpha=2.0, rs=True)
    want = run(model)
    path = tmp_path / "rs.safetensors"
    meta = lora.save(path, model)
    assert meta["lora_scaling"] == "alpha/sqrt(r)"
    with safe_open(str(path), "pt") as f:
        # Written so that alpha_file / r is the scale, which is what every other reader computes.
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.alpha").item()
    assert alpha / 16 == pytest.approx(2.0 / math.sqrt(16))
    fresh = unet()
    lora.load(path, fresh)
    layer = fresh.get_submodule("input_blocks.1.1.proj_in")
    assert layer.rs and layer.alpha == pytest.approx(2.0) and layer.rank == 16
    close(run(fresh), want)


def test_pissa_export_is_the_change_from_the_original_weights(tmp_path):
    model = unet()
    lora.inject(model, rank=3, alpha=3, targets="attn", init="pissa")
    with torch.no_grad():  # a "training step" so the factors are no longer their starting values
        for p in lora.lora_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    want = run(model)
    path = tmp_path / "pissa.safetensors"
    lora.save(path, model)
    fresh = unet()  # the ORIGINAL base weights, as a user of the file has them
    lora.load(path, fresh)
    assert fresh.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q").rank == 6
    close(run(fresh), want, 1e-4)


def test_merged_load_and_several_loras(tmp_path):
    a, b = trained(rank=2, alpha=1.0), trained(targets="attn", rank=5, alpha=7.0)
    randomize_lora(b, seed=9)
    lora.save(tmp_path / "a.safetensors", a)
    lora.save(tmp_path / "b.safetensors", b, format="diffusers")
    base = run(unet())

    live = unet()
    ia = lora.load(tmp_path / "a.safetensors", live, scale=0.5)
    ib = lora.load(tmp_path / "b.safetensors", live, scale=-1.5)
    assert (ia.name, ib.name) == ("a", "b")
    both = run(live)

    merged = unet()
    lora.load(tmp_path / "a.safetensors", merged, scale=0.5, merge=True)
    lora.load(tmp_path / "b.safetensors", merged, scale=-1.5, merge=True)
    assert not lora.lora_layers(merged)
    close(run(merged), both, 1e-4)

    # Each LoRA's delta is linear in its own scale; the model output is not, so compare weights.
    lora.set_multiplier(live, 0.0, name="b")
    only_a = unet()
    lora.load(tmp_path / "a.safetensors", only_a, scale=0.5)
    close(run(live), run(only_a))
    lora.set_multiplier(live, 0.0)
    close(run(live), base, 0)
    with pytest.raises(ValueError, match="already has a LoRA named 'a'"):
        lora.load(tmp_path / "a.safetensors", live)
    lora.merge(live)
    assert lora.remove(live, name="a") and lora.lora_layers(live, "b")


def test_text_encoder_and_unet_in_one_file(tmp_path):
    te = randomize(ClipLTextEncoder(ClipLConfig.tiny())).eval()
    model = unet(dataclasses.replace(SD1, context_dim=te.config.width))
    parts = {"unet": model, "text_encoder": te}
    lora.inject(model, rank=4, targets="attn")
    lora.inject(te, rank=2, alpha=1, targets="attn-mlp")
    randomize_lora(model)
    randomize_lora(te)
    tokens = torch.randint(0, te.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_te = te(tokens)
    want_unet = run(model)
    path = tmp_path / "both.safetensors"
    lora.save(path, parts)
    with safe_open(str(path), "pt") as f:
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in f.keys()
        assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in f.keys()

    fresh_te = randomize(ClipLTextEncoder(ClipLConfig.tiny())).eval()
    fresh_unet = unet(model.cfg)
    with pytest.raises(ValueError, match="keys for a text encoder, but none was given"):
        lora.load(path, fresh_unet)
    assert not lora.lora_layers(fresh_unet)  # the failed load changed nothing
    info = lora.load(path, fresh_unet, strict=False)  # UNet only, the text-encoder part reported as skipped
    assert info.skipped and all(k.startswith("lora_te_") for k in info.skipped)
    lora.remove(fresh_unet)
    lora.load(path, {"unet": fresh_unet, "text_encoder": fresh_te})
    with torch.no_grad():
        close(fresh_te(tokens), want_te)
    close(run(fresh_unet), want_unet)


def test_open_clip_text_encoder_names(tmp_path):
    te = randomize(OpenClipTextEncoder(OpenClipConfig.tiny())).eval()
    lora.inject(te, rank=2, targets="attn-mlp")
    randomize_lora(te)
    tokens = torch.randint(0, te.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = te(tokens)
    path = tmp_path / "te.safetensors"
    lora.save(path, {"text_encoder": te})
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight" in keys
    fresh = randomize(OpenClipTextEncoder(OpenClipConfig.tiny())).eval()
    lora.load(path, {"text_encoder": fresh})
    with torch.no_grad():
        close(fresh(tokens), want)


# ------------------------------------------------------------------------ names: what sd-scripts writes

def sd_scripts_names(diffusers_unet: nn.Module) -> set[str]:
    """The names sd-scripts gives, by its rule: every Linear/Conv2d child of a Transformer2DModel,
    ResnetBlock2D, Downsample2D or Upsample2D, named 'lora_unet.' + parent + '.' + child with '.' -> '_'."""
    owners = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
    out = set()
    for name, module in diffusers_unet.named_modules():
        if type(module).__name__ in owners:
            for child_name, child in module.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d"):
                    out.add(f"lora_unet.{name}.{child_name}".replace(".", "_"))
    return out


def diffusers_unet_for(cfg: UNetConfig) -> nn.Module:
    """An (empty, meta) diffusers UNet2DConditionModel with the same block structure."""
    from diffusers import UNet2DConditionModel
    levels = len(cfg.channel_mult)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=tuple(cfg.level_channels), layers_per_block=cfg.num_res_blocks,
            down_block_types=tuple(down), up_block_types=tuple(up), cross_attention_dim=cfg.context_dim,
            transformer_layers_per_block=[max(1, d) for d in cfg.transformer_depth],
            attention_head_dim=[8] * levels, use_linear_projection=cfg.use_linear_in_transformer,
            norm_num_groups=32)


@pytest.mark.parametrize("cfg", [UNetConfig.sd1(), UNetConfig.sd2(), RICH], ids=["sd1", "sd2", "rich"])
def test_names_equal_what_sd_scripts_writes(cfg):
    with torch.device("meta"):
        ours = UNetModel(cfg)
    paths = lora.inject(ours, rank=4, targets="all")
    mine = {kohya_name(p, "unet", cfg.num_res_blocks) for p in paths}
    assert len(mine) == len(paths)
    assert mine == sd_scripts_names(diffusers_unet_for(cfg))


# ------------------------------------------------------------------------ diffusers reads our kohya file

def peft_unet(ours: nn.Module, **options) -> nn.Module:
    """`ours` as a diffusers UNet with a peft LoRA (r=4, alpha 8, attn2.to_k alpha 2; attention, proj_in and the
    ResBlocks' conv1) of random factors; `options` go to LoraConfig (use_rslora, use_dora). A DoRA's magnitudes
    are scaled by 1 + N(0, 0.1²) so that they differ from W0's norms."""
    from peft import LoraConfig

    ref = diffusers_unet(RICH, ours.state_dict())
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, alpha_pattern={"attn2.to_k": 2}, **options,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ref


def diffusers_unet(cfg: UNetConfig, ldm_sd: dict[str, torch.Tensor]) -> nn.Module:
    """A diffusers UNet2DConditionModel made from our state dict by diffusers' own single-file conversion."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    params = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
                  attention_resolutions=[2**i for i, a in enumerate(cfg.attention_levels) if a],
                  num_res_blocks=cfg.num_res_blocks, channel_mult=list(cfg.channel_mult),
                  transformer_depth=list(cfg.transformer_depth), context_dim=cfg.context_dim,
                  use_linear_in_transformer=cfg.use_linear_in_transformer, use_spatial_transformer=True)
    if cfg.num_heads is not None:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.head_dim
    levels = len(cfg.channel_mult)
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1] * levels}}}}}}
    checkpoint = {"model.diffusion_model." + k: v for k, v in ldm_sd.items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    if cfg.head_dim is not None:
        config["attention_head_dim"] = [max(1, c // cfg.head_dim) for c in cfg.level_channels]
    config["transformer_layers_per_block"] = [max(1, d) for d in cfg.transformer_depth]
    model = UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def diffusers_load(model: nn.Module, path, adapter: str, part: str = "unet") -> None:
    """What StableDiffusionPipeline.load_lora_weights does, on the bare UNet / text encoder."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
    state_dict, alphas = Loader.lora_state_dict(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unmatched key would only be a warning in diffusers
        if part == "unet":
            Loader.load_lora_into_unet(state_dict, alphas, model, adapter_name=adapter)
        else:
            Loader.load_lora_into_text_encoder(state_dict, alphas, model, adapter_name=adapter)


CASES = [  # (config, targets, rank, alpha, scale)
    (SD1, "attn", 4, 4.0, 1.0),
    (SD1, "attn-mlp", 8, 1.0, 0.6),
    (SD2, "attn-mlp", 3, 12.0, -0.8),
    (RICH, "all", 2, 5.0, 1.7),
]


@pytest.mark.parametrize("cfg,targets,rank,alpha,scale", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_diffusers_reads_our_kohya_file_the_same(tmp_path, cfg, targets, rank, alpha, scale):
    ours = unet(cfg, seed=3)
    base_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.inject(ours, rank=rank, alpha=alpha, targets=targets)
    randomize_lora(ours, seed=rank)
    lora.set_multiplier(ours, scale)
    path = tmp_path / "ours.safetensors"
    lora.save(path, ours)

    ref = diffusers_unet(cfg, base_sd)
    diffusers_load(ref, path, "ours")
    ref.set_adapters(["ours"], weights=[scale])
    x, t, c = inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, c)
        want = ref(x, t, encoder_hidden_states=c).sample
        lora.set_multiplier(ours, 0.0)
        base = ours(x, t, c)
    assert (want - base).abs().max() > 0.05  # the LoRA really changes the output
    close(got, want, 1e-4)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_reads_our_text_encoder_lora(tmp_path, fmt):
    from transformers import CLIPTextModel
    te = randomize(ClipLTextEncoder(ClipLConfig.tiny())).eval()
    ref = CLIPTextModel(te.config.to_transformers()).eval()
    ref.load_state_dict(te.transformer.text_model.state_dict())
    lora.inject(te, rank=4, alpha=3.0, targets="attn-mlp")
    randomize_lora(te)
    path = tmp_path / "te.safetensors"
    lora.save(path, {"text_encoder": te}, format=fmt)
    diffusers_load(ref, path, "ours", part="te")
    tokens = torch.randint(0, te.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(te(tokens), ref(input_ids=tokens).last_hidden_state)


def test_diffusers_reads_our_diffusers_file(tmp_path):
    ours = unet(RICH, seed=3)
    base_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.inject(ours, rank=4, alpha=1.0, targets="all", rank_overrides={"*attn2*": 6})
    randomize_lora(ours)
    path = tmp_path / "d.safetensors"
    lora.save(path, ours, format="diffusers")
    ref = diffusers_unet(RICH, base_sd)
    diffusers_load(ref, path, "ours")
    x, t, c = inputs(RICH)
    with torch.no_grad():
        close(ours(x, t, c), ref(x, t, encoder_hidden_states=c).sample, 1e-4)


@pytest.mark.parametrize("rs", [False, True])
def test_we_read_a_file_diffusers_trained_and_saved(tmp_path, rs):
    """diffusers + peft train and save (with its lora_adapter_metadata: alpha, alpha_pattern, use_rslora)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
    from peft.utils import get_peft_model_state_dict

    ours = unet(RICH, seed=3)
    ref = peft_unet(ours, use_rslora=rs)
    Loader.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref),
                             unet_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    info = lora.load(tmp_path / "pytorch_lora_weights.safetensors", ours)
    assert info.format == "diffusers"
    layer = ours.get_submodule("output_blocks.4.1.transformer_blocks.0.attn2.to_k")
    assert (layer.alpha, layer.rs) == (2.0, rs)
    x, t, c = inputs(RICH)
    with torch.no_grad():
        close(ours(x, t, c), ref(x, t, encoder_hidden_states=c).sample, 1e-4)


# ----------------------------------------------------------------------------------- other tools' files

def sd_scripts_style_file(path, cfg: UNetConfig, rank: int, with_alpha: bool, conv: bool = False) -> dict:
    """A file as sd-scripts writes it, named from a diffusers UNet by sd-scripts' rule (not by our code)."""
    ref = diffusers_unet_for(cfg)
    owners = ("Transformer2DModel",) + (("ResnetBlock2D", "Downsample2D", "Upsample2D") if conv else ())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in ref.named_modules():
        if type(module).__name__ not in owners:
            continue
        for child_name, child in module.named_modules():
            if type(child).__name__ not in ("Linear", "Conv2d"):
                continue
            key = f"lora_unet.{name}.{child_name}".replace(".", "_")
            if isinstance(child, nn.Linear):
                down, up = (rank, child.in_features), (child.out_features, rank)
            else:
                down, up = (rank, child.in_channels, *child.kernel_size), (child.out_channels, rank, 1, 1)
            tensors[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * 0.2
            tensors[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * 0.2
            if with_alpha:
                tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("with_alpha", [True, False])
def test_sd_scripts_and_locon_files(tmp_path, with_alpha):
    path = tmp_path / "kohya.safetensors"
    tensors = sd_scripts_style_file(path, RICH, rank=4, with_alpha=with_alpha, conv=True)
    model = unet(RICH)
    info = lora.load(path, model)
    assert len(info.modules) == len(tensors) // (3 if with_alpha else 2)
    layer = model.get_submodule("output_blocks.4.1.transformer_blocks.0.ff.net.2")
    assert layer.alpha == (2.0 if with_alpha else 4.0)  # no alpha in the file means alpha = rank
    key = "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2"
    assert unet_to_diffusers("output_blocks.4.1.transformer_blocks.0.ff.net.2", 2).replace(".", "_") == key[10:]
    torch.testing.assert_close(layer.lora_up.weight, tensors[f"{key}.lora_up.weight"])
    conv = model.get_submodule("input_blocks.3.0.op")  # LoCon 3x3 stride-2 conv
    want = tensors["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"]
    torch.testing.assert_close(conv.lora_down.weight, want)


def test_old_diffusers_layouts(tmp_path):
    model = trained(targets="attn")
    want = run(model)
    new = lora.lora_state_dict(model, format="diffusers")
    legacy = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
              for k, v in new.items()}
    processor = {}
    for k, v in new.items():  # attention-processor era: no 'unet.' prefix, 'attn1.processor.to_q_lora.down.weight'
        k = k.removeprefix("unet.").replace(".to_out.0.", ".to_out.")
        stem, _, role = k.rpartition(".lora_")
        module, _, proj = stem.rpartition(".")
        processor[f"{module}.processor.{proj}_lora.{'down' if role.startswith('A') else 'up'}.weight"] = v
    for name, tensors in (("legacy", legacy), ("processor", processor)):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        fresh = unet()
        lora.load(path, fresh)
        close(run(fresh), want)
    pt = tmp_path / "pytorch_lora_weights.bin"
    torch.save(processor, pt)
    fresh = unet()
    lora.load(pt, fresh)
    close(run(fresh), want)


# -------------------------------------------------------------------------------------------- bad files

def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_lora_for_another_base_is_refused(tmp_path):
    sd2_like = dataclasses.replace(SD2, context_dim=64)  # a different text width, as SD2 (1024) vs SD1 (768)
    path = tmp_path / "sd2.safetensors"
    lora.save(path, trained(sd2_like, targets="attn"))
    model = unet(SD1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        lora.load(path, model)
    msg = str(err.value)
    assert "sd2.safetensors" in msg and "shape mismatch" in msg and "attn2_to_k" in msg
    assert "context width is 64 but the model's is 32" in msg
    assert "attn1_to_q" not in msg  # only what does not fit is listed
    assert_untouched(model, before)


def test_unknown_keys_and_missing_halves(tmp_path):
    tensors = lora.lora_state_dict(trained(targets="attn"))
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32, 1, 1)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4, 1, 1)
    tensors["something_else.weight"] = torch.zeros(1)
    del tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    model = unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        lora.load(path, model)
    msg = str(err.value)
    assert "bad.safetensors" in msg and "nothing was changed" in msg
    assert "match no UNet module" in msg and "down_blocks_9_attentions_0_proj_in" in msg
    assert "unknown key" in msg and "something_else.weight" in msg
    assert "missing their down or up weight" in msg and "mid_block_attentions_0_transformer_blocks_0_attn1_to_q" in msg
    assert_untouched(model, before)


@pytest.mark.parametrize("key,what", [
    ("lora_unet_mid_block_attentions_0_proj_in.oft_blocks", "OFT"),
    ("lora_unet_mid_block_attentions_0_proj_in.diff", "full weight differences"),
    ("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a", "LoHa modules missing"),
    ("lora_unet_mid_block_attentions_0_proj_in.lokr_w1", "LoKr modules missing"),
    ("lora_unet_mid_block_attentions_0_proj_in.dora_scale", "missing their down or up"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "SDXL"),
])
def test_unsupported_lora_types_are_named(tmp_path, key, what):
    tensors = lora.lora_state_dict(trained(targets="attn"))
    tensors[key] = torch.zeros(2, 2)
    path = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(path))
    model = unet()
    with pytest.raises(ValueError, match=what):
        lora.load(path, model)
    assert not lora.lora_layers(model)


def test_save_needs_a_lora_and_one_per_module(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.save(tmp_path / "x.safetensors", unet())
    model = trained(targets="attn")
    lora.inject(model, rank=2, targets="attn", name="second")
    with pytest.raises(ValueError, match="several LoRAs"):
        lora.save(tmp_path / "x.safetensors", model)
    lora.save(tmp_path / "x.safetensors", model, name="second")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        down = f.get_tensor("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight")
    assert down.shape[0] == 2
    assert not os.path.exists(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        lora.load(tmp_path / "missing.safetensors", model)


# ------------------------------------------------------------------------ SD2's packed q/k/v text encoder

def test_sd2_text_encoder_file_on_packed_qkv_live_and_merged(tmp_path):
    """A kohya TE LoRA for SD2 names CLIPTextModel layers; q/k/v land in thirds of OpenCLIP's in_proj_weight, live (a
    PackedLoRA) or merged. Checked against diffusers: the same file on diffusers' own conversion of the same weights."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = OpenClipConfig.tiny()
    ours = randomize(OpenClipTextEncoder(config), seed=2).eval()
    checkpoint = {"cond_stage_model." + k: v.clone() for k, v in ours.state_dict().items()}
    layers = config.layers - 1  # SD2 runs the penultimate block; diffusers drops the last one
    ref = CLIPTextModel(CLIPTextConfig(vocab_size=config.vocab_size, hidden_size=config.width,
                                       intermediate_size=config.mlp_width, num_hidden_layers=layers,
                                       num_attention_heads=config.heads, max_position_embeddings=77,
                                       hidden_act="gelu")).eval()
    converted = convert_open_clip_checkpoint(ref, checkpoint, prefix="cond_stage_model.model.")
    converted = {k.removeprefix("text_model.") if not hasattr(ref, "text_model") else k: v
                 for k, v in converted.items()
                 if k != "text_projection.weight" and not k.startswith(f"text_model.encoder.layers.{layers}.")}
    ref.load_state_dict(converted, strict=True)

    g = torch.Generator().manual_seed(4)
    w, rank = config.width, 2
    tensors = {}
    for i in range(layers):
        for proj, (d_in, d_out) in {"q_proj": (w, w), "k_proj": (w, w), "v_proj": (w, w), "out_proj": (w, w)}.items():
            key = f"lora_te_text_model_encoder_layers_{i}_self_attn_{proj}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, d_in, generator=g) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(d_out, rank, generator=g) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "sd2_te.safetensors"
    save_file(tensors, str(path))

    live = randomize(OpenClipTextEncoder(config), seed=2).eval()
    info = lora.load(path, {"text_encoder": live}, scale=0.7)
    assert len(info.modules) == 4 * layers and len(lora.lora_layers(live)) == 2 * layers  # out_proj + packed q/k/v
    lora.load(path, {"text_encoder": ours}, scale=0.7, merge=True)
    diffusers_load(ref, path, "te", part="te")
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters
    set_weights_and_activate_adapters(ref, ["te"], [0.7])  # what the pipeline's set_adapters does for a text encoder
    tokens = torch.randint(1, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(tokens)
        want = ref(input_ids=tokens).last_hidden_state
        got_live = live(tokens)
    close(got, want, 1e-4)
    close(got_live, want, 1e-4)


# -------------------------------------------------------------------------------- as a new user would

@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_with_a_loaded_checkpoint(tmp_path, version):
    """sd.load a checkpoint, inject, train a little, save; a fresh load plus the file gives the same model."""
    import sd
    from sd.tiny import tiny_state_dict

    ckpt = tmp_path / f"{version}.safetensors"
    save_file(tiny_state_dict(version), str(ckpt))
    model = sd.load(ckpt)
    lora.inject(model.unet, rank=4, alpha=4, targets="attn-mlp")
    lora.inject(model.text_encoder, rank=2, targets="attn")
    params = lora.lora_parameters(model.unet) + lora.lora_parameters(model.text_encoder)
    assert params and all(p.requires_grad for p in params)
    randomize_lora(model.unet)
    randomize_lora(model.text_encoder)
    prompt = model.tokenize(["a cat"])
    x, t, _ = inputs(model.unet.cfg)
    with torch.no_grad():
        want = model.unet(x, t, model.text_encoder(prompt))
    path = tmp_path / "mine.safetensors"
    meta = lora.save(path, model)
    assert meta["ss_base_model_version"].startswith("sd_v1" if version == "sd1" else "sd_v2")
    fresh = sd.load(ckpt)
    lora.load(path, fresh)
    with torch.no_grad():
        close(fresh.unet(x, t, fresh.text_encoder(prompt)), want, 1e-4)
    # A full checkpoint can still be written under the original keys.
    assert set(lora.base_state_dict(model.unet)) == set(sd.load(ckpt).unet.state_dict())

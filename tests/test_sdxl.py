"""SDXL: a tiny SDXL-shaped file loads with sd.load, matches diffusers' single-file converters (UNet with y, both
text encoders), samples, and its LoRA files use sd-scripts' SDXL names and load in diffusers with the same output."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open

import lora
import sampling
import sd
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict
from text import SDXLTextConfig, SDXLTextEncoder, size_embedding, vector_conditioning
from text.tokenizer import END_ID
from unet import UNetConfig, UNetModel

pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat", "two red squares, don't blur"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tensors = tiny_state_dict("sdxl", seed=5)
    path = write_state_dict(tmp_path_factory.mktemp("xl") / "xl.safetensors", tensors)
    return tensors, path


@pytest.fixture(scope="module")
def model(tiny):
    return sd.load(tiny[1])


def unet_part(tensors):
    prefix = "model.diffusion_model."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------- loading

def test_sd_load_detects_sdxl(model):
    assert model.version == "sdxl" and model.prediction_type == "epsilon"
    assert model.scale_factor == 0.13025 and model.needs_y
    assert isinstance(model.text_encoder, SDXLTextEncoder)
    cfg, text = model.unet.cfg, model.text_encoder.config
    assert cfg.attention_levels == (False, True) and cfg.adm_in_channels == text.pooled_dim + 6 * 256
    assert cfg.context_dim == text.clip_l.width + text.open_clip.width


def test_strict_round_trip(tiny, model, tmp_path):
    tensors, _ = tiny
    out = model.state_dict()
    assert set(out) == set(tensors)
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)
    again = sd.load(model.save(tmp_path / "again.safetensors"))
    assert again.version == "sdxl"
    assert all(torch.equal(v, tensors[k]) for k, v in again.state_dict().items())


def test_bad_sdxl_files(tiny, tmp_path):
    tensors, _ = tiny
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in tensors.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(sd.CheckpointError, match="refiner"):
        sd.load(write_state_dict(tmp_path / "refiner.safetensors", refiner))
    with pytest.raises(sd.CheckpointError, match="text_layer"):
        sd.load(tiny[1], text_layer="last")
    # A UNet that reads another context width than the two towers give.
    wrong = dict(tensors)
    del wrong["conditioner.embedders.1.model.text_projection"]
    with pytest.raises(sd.CheckpointError, match="text_projection"):
        sd.load(write_state_dict(tmp_path / "noproj.safetensors", wrong))


def test_full_size_shapes_on_meta():
    """SDXL base sizes: the towers give context 768 + 1280 = 2048 and y = 1280 + 6 * 256 = 2816, which is what the
    full-size UNet (2,567,463,684 parameters in 1,680 tensors, checked in test_unet.py) reads."""
    with torch.device("meta"):
        text = SDXLTextEncoder(SDXLTextConfig.sdxl())
        unet = UNetModel(UNetConfig.sdxl())
    sd_text = text.state_dict()
    assert SDXLTextConfig.from_state_dict(sd_text) == SDXLTextConfig.sdxl()
    assert text.config.width == unet.cfg.context_dim == 2048
    assert text.config.adm_in_channels == unet.cfg.adm_in_channels == 2816
    assert sd_text["embedders.1.model.text_projection"].shape == (1280, 1280)
    assert sd_text["embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    assert "embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in sd_text
    assert UNetConfig.from_state_dict(unet.state_dict()) == UNetConfig.sdxl()


# --------------------------------------------------------------------------------- parity with diffusers

def diffusers_sdxl_unet(cfg: UNetConfig, ldm_sd: dict[str, torch.Tensor]):
    """diffusers' UNet2DConditionModel with SDXL's text_time added conditioning, from its single-file converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    params = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
                  attention_resolutions=[2**i for i, a in enumerate(cfg.attention_levels) if a],
                  num_res_blocks=cfg.num_res_blocks, channel_mult=list(cfg.channel_mult),
                  transformer_depth=list(cfg.transformer_depth), context_dim=cfg.context_dim,
                  use_linear_in_transformer=True, use_spatial_transformer=True, num_head_channels=cfg.head_dim,
                  num_classes="sequential", adm_in_channels=cfg.adm_in_channels)
    original = {"model": {"params": {"network_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2]}}}}}}
    checkpoint = {"model.diffusion_model." + k: v for k, v in ldm_sd.items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    # diffusers recognises SDXL by its full context width (2048); the tiny one needs the SDXL choice made explicitly.
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=cfg.adm_in_channels)
    config["attention_head_dim"] = [max(1, c // cfg.head_dim) for c in cfg.level_channels]
    config["transformer_layers_per_block"] = [max(1, d) for d in cfg.transformer_depth]
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return ref.eval()


def test_unet_with_y_matches_diffusers(tiny, model):
    tensors, _ = tiny
    ref = diffusers_sdxl_unet(model.unet.cfg, unet_part(tensors))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    ctx = torch.randn(2, 77, model.unet.cfg.context_dim, generator=g)
    pooled = torch.randn(2, model.text_encoder.config.pooled_dim, generator=g)
    # Per-image sizes (as buckets give): original (h, w), crop (top, left), target (h, w).
    original, crop, target = torch.tensor([[768, 1024], [512, 640]]), torch.tensor([[0, 16], [32, 0]]), (1024, 1024)
    y = model.vector(pooled, original, crop, target)
    time_ids = torch.cat([original, crop, torch.tensor([target, target])], dim=1).float()
    with torch.no_grad():
        got = model.unet(x, t, ctx, y)
        want = ref(x, t, encoder_hidden_states=ctx,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        other = model.unet(x, t, ctx, model.vector(pooled, original, crop, (512, 512)))
    assert rel_err(got, want) < 1e-5
    assert rel_err(other, want) > 1e-3  # the size conditioning really reaches the output


def test_size_embedding_order_and_defaults():
    emb = size_embedding((768, 1024), (0, 16), (1024, 512), batch=2)
    assert emb.shape == (2, 6 * 256) and torch.equal(emb[0], emb[1])
    from unet.model import timestep_embedding
    want = timestep_embedding(torch.tensor([768.0, 1024, 0, 16, 1024, 512]), 256).flatten()
    assert torch.equal(emb[0], want)
    pooled = torch.randn(1, 8)
    assert torch.equal(vector_conditioning(pooled, (64, 96)), vector_conditioning(pooled, (64, 96), (0, 0), (64, 96)))
    with pytest.raises(ValueError, match="original_size"):
        size_embedding((1, 2, 3), (0, 0), (1, 1), batch=1)


def _load_ref(ref, converted):
    if not hasattr(ref, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def diffusers_text_encoders(tensors, config: SDXLTextConfig):
    """SDXL's text_encoder (CLIPTextModel) and text_encoder_2 (CLIPTextModelWithProjection), from diffusers' converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cl, cg = config.clip_l, config.open_clip
    te1 = CLIPTextModel(cl.to_transformers())
    _load_ref(te1, convert_ldm_clip_checkpoint(tensors))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=cg.vocab_size, hidden_size=cg.width, intermediate_size=cg.mlp_width, num_hidden_layers=cg.layers,
        num_attention_heads=cg.heads, max_position_embeddings=77, hidden_act="gelu", projection_dim=cg.embed_dim,
        bos_token_id=49406, eos_token_id=END_ID, pad_token_id=0))
    _load_ref(te2, convert_open_clip_checkpoint(te2, tensors, prefix="conditioner.embedders.1.model."))
    return te1, te2


def reference_encode(te1, te2, tokens_l, tokens_g):
    """What StableDiffusionXLPipeline.encode_prompt computes (clip_skip=None): penultimate hidden states of both,
    concatenated, and text_encoder_2's projected pooled output."""
    out1 = te1(input_ids=tokens_l, output_hidden_states=True)
    out2 = te2(input_ids=tokens_g, output_hidden_states=True)
    return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), out2.text_embeds


def test_text_encoders_match_diffusers(tiny, model):
    tensors, _ = tiny
    te1, te2 = diffusers_text_encoders(tensors, model.text_encoder.config)
    tokens_l, tokens_g = model.tokenize(PROMPTS + [""])
    assert (tokens_l[:, -1] == END_ID).all() and (tokens_g[:, -1] == 0).all()  # CLIP-L pads with end, bigG with 0
    with torch.no_grad():
        context, pooled = model.encode_text(PROMPTS + [""])
        want_context, want_pooled = reference_encode(te1, te2, tokens_l, tokens_g)
    assert context.shape == (3, 77, model.unet.cfg.context_dim)
    assert rel_err(context, want_context) < 1e-5 and rel_err(pooled, want_pooled) < 1e-5


# ------------------------------------------------------------------------------------------- sampling

def test_generate_runs_and_zeroes_the_empty_negative(model):
    images = sampling.generate(model, PROMPTS, steps=2, cfg=5.0, height=32, width=48, progress=False)
    assert images.shape == (2, 3, 32, 48) and torch.isfinite(images).all()
    again = sampling.generate(model, PROMPTS[0], steps=2, cfg=5.0, height=32, width=48, progress=False)
    torch.testing.assert_close(again[0], images[0], atol=1e-5, rtol=0)  # same seed, same image, whatever the batch
    # The empty negative prompt is zeros, as sgm and diffusers sample SDXL.
    from sampling.generate import _sdxl_conditioning
    with torch.no_grad():
        _, y, uncond, y_uncond = _sdxl_conditioning(model, PROMPTS, ["", "blurry"], 32, 48)
    assert uncond[0].abs().max() == 0 and uncond[1].abs().max() > 0
    pooled_dim = model.text_encoder.config.pooled_dim
    assert y_uncond[0, :pooled_dim].abs().max() == 0
    assert torch.equal(y_uncond[0, pooled_dim:], y[0, pooled_dim:])  # sizes are kept
    with pytest.raises(ValueError, match="conditioning vector y"):
        c = model.encode_prompt(PROMPTS)
        sampling.sample_latents(model, c, None, steps=1, cfg=1.0, height=32, width=32)


# ----------------------------------------------------------------------------------------------- LoRA

def test_lora_names_are_sd_scripts_sdxl_names():
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.sdxl())
        text = SDXLTextEncoder(SDXLTextConfig.sdxl())
    lora.inject(unet, rank=1, targets="all")
    lora.inject(text, rank=1, targets="attn-mlp")
    names = {k.split(".")[0] for k in lora.lora_state_dict({"unet": unet, "text_encoder": text})}
    for name in ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
                 "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k", "lora_unet_middle_block_1_proj_in",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_output_blocks_0_0_skip_connection", "lora_unet_input_blocks_1_0_emb_layers_1",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_11_mlp_fc2",
                 "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1"]:
        assert name in names, name
    # sd-scripts' SDXL rule (its own LDM-named UNet; conv LoRA on): every Linear/Conv2d under a transformer,
    # res block, down- or upsampler, named by its path.
    with torch.device("meta"):
        plain = UNetModel(UNetConfig.sdxl())
    owners = ("SpatialTransformer", "ResBlock", "Downsample", "Upsample")
    want = {f"lora_unet_{p}.{c}".replace(".", "_") for p, m in plain.named_modules() if type(m).__name__ in owners
            for c, child in m.named_modules() if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d))}
    assert {n for n in names if n.startswith("lora_unet_")} == want


def _inject_random(model, seed=1):
    lora.inject(model.unet, rank=4, alpha=2.0, targets="all")
    lora.inject(model.text_encoder, rank=2, alpha=1.0, targets="attn-mlp")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model.unet) + lora.lora_layers(model.text_encoder):
            for p in layer.adapter_parameters():  # A, B; a packed q/k/v layer (OpenCLIP bigG): an A and a B per third
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_lora_file_round_trip_and_diffusers_reads_it(tiny, tmp_path):
    """Our kohya SDXL file (sgm UNet names, lora_te1_/lora_te2_) on diffusers' SDXL LoRA loader, applied to diffusers'
    conversion of the same checkpoint, gives the same UNet output and the same text embeddings."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as Loader

    tensors, path = tiny
    ours = sd.load(path)
    _inject_random(ours)
    lora_path = tmp_path / "xl_lora.safetensors"
    meta = lora.save(lora_path, ours)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    with safe_open(str(lora_path), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)

    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600])
    with torch.no_grad():
        context, pooled = ours.encode_text(PROMPTS)
        y = ours.vector(pooled, (64, 64))
        want = ours.unet(x, t, context, y)

    # Our own reader: a fresh load plus the file computes the same.
    fresh = sd.load(path)
    lora.load(lora_path, fresh)
    with torch.no_grad():
        c2, p2 = fresh.encode_text(PROMPTS)
        torch.testing.assert_close(c2, context, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p2, pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh.unet(x, t, context, y), want, atol=1e-5, rtol=1e-5)

    # diffusers.
    ref_unet = diffusers_sdxl_unet(ours.unet.cfg, unet_part(tensors))
    te1, te2 = diffusers_text_encoders(tensors, ours.text_encoder.config)
    state_dict, alphas = Loader.lora_state_dict(str(lora_path), unet_config=ref_unet.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unmatched key would only be a warning in diffusers
        Loader.load_lora_into_unet(dict(state_dict), alphas, ref_unet, adapter_name="ours")
        Loader.load_lora_into_text_encoder(dict(state_dict), alphas, te1, prefix="text_encoder", adapter_name="ours")
        Loader.load_lora_into_text_encoder(dict(state_dict), alphas, te2, prefix="text_encoder_2", adapter_name="ours")
    tokens_l, tokens_g = ours.tokenize(PROMPTS)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        ref_context, ref_pooled = reference_encode(te1, te2, tokens_l, tokens_g)
        ref_out = ref_unet(x, t, encoder_hidden_states=context,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        lora.set_multiplier(ours.unet, 0.0)
        lora.set_multiplier(ours.text_encoder, 0.0)
        base = ours.unet(x, t, context, y)
        base_context, base_pooled = ours.encode_text(PROMPTS)
    assert rel_err(ref_context, context) < 1e-4 and rel_err(ref_pooled, pooled) < 1e-4
    assert rel_err(ref_out, want) < 1e-4
    # the LoRA really changes the output, the context of both towers and the pooled vector
    width_l = ours.text_encoder.config.clip_l.width
    assert rel_err(base, want) > 1e-2 and rel_err(base_pooled, pooled) > 1e-2
    assert rel_err(base_context[..., :width_l], context[..., :width_l]) > 1e-2
    assert rel_err(base_context[..., width_l:], context[..., width_l:]) > 1e-2


def test_sdxl_file_on_an_sd1_model_is_refused(tmp_path, tiny):
    ours = sd.load(tiny[1])
    _inject_random(ours)
    path = tmp_path / "xl.safetensors"
    lora.save(path, ours)
    sd1 = sd.load(write_state_dict(tmp_path / "sd1.safetensors", tiny_state_dict("sd1")))
    with pytest.raises(ValueError, match="SDXL text encoder"):
        lora.load(path, sd1)


def test_float16_keeps_the_sdxl_vae_in_float32(tiny):
    half = sd.load(tiny[1], dtype=torch.float16)
    assert half.dtype == torch.float16 and next(half.text_encoder.parameters()).dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float32  # SDXL's VAE overflows in float16
    with torch.no_grad():
        images = half.decode_latents(torch.randn(1, 4, 4, 4, dtype=torch.float16))
        latents = half.encode_images(images.clamp(-1, 1).half())
    assert images.dtype == latents.dtype == torch.float32 and torch.isfinite(images).all()

"""End to end: a file loaded with sd.load gives the same UNet, VAE and text-encoder outputs as diffusers'
single-file converters applied to the same file (diffusers and transformers are test-only references here)."""
from __future__ import annotations

import pytest
import torch

import sd
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict

pytest.importorskip("diffusers")
from test_text import load_reference, reference_clip  # noqa: E402  (shared reference builders)
from test_unet import diffusers_reference  # noqa: E402
from test_vae import to_diffusers  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_loaded_file_matches_diffusers_converters(version, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    tensors = tiny_state_dict(version, seed=5)
    path = write_state_dict(tmp_path / f"{version}.safetensors", tensors)
    model = sd.load(path)
    g = torch.Generator().manual_seed(0)

    # UNet
    unet_sd = {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    ref_unet = diffusers_reference(model.unet.cfg, unet_sd)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    ctx = torch.randn(2, 77, model.unet.cfg.context_dim, generator=g)
    with torch.no_grad():
        assert rel_err(model.unet(x, t, ctx), ref_unet(x, t, encoder_hidden_states=ctx).sample) < 1e-5

    # VAE
    ref_vae = to_diffusers(model.vae)
    images = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        post, ref_post = model.vae.encode(images), ref_vae.encode(images).latent_dist
        assert rel_err(post.mean, ref_post.mean) < 1e-5 and rel_err(post.logvar, ref_post.logvar) < 1e-5
        z = post.mean
        assert rel_err(model.vae.decode(z), ref_vae.decode(z).sample) < 1e-5

    # Text encoder, fed by our tokenizer
    cfg = model.text_encoder.config
    tokens = model.tokenize(["a photo of a cat", "two red squares, don't blur"])
    if version == "sd1":
        ref = reference_clip(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, "quick_gelu")
        load_reference(ref, convert_ldm_clip_checkpoint(tensors))
    else:  # SD2 runs the penultimate block: diffusers drops the last one
        ref = reference_clip(cfg.width, cfg.layers - 1, cfg.heads, cfg.mlp_width, "gelu")
        converted = convert_open_clip_checkpoint(ref, tensors, prefix="cond_stage_model.model.")
        converted.pop("text_projection.weight", None)
        load_reference(ref, {k: v for k, v in converted.items() if not k.startswith(f"text_model.encoder.layers.{cfg.layers - 1}.")})
    with torch.no_grad():
        assert rel_err(model.encode_prompt(["a photo of a cat", "two red squares, don't blur"]),
                       ref(input_ids=tokens).last_hidden_state) < 1e-5

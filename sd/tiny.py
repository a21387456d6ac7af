"""Tiny SD1/SD2-shaped checkpoints with random weights, in the original file layout: for tests and demos."""
from __future__ import annotations

import dataclasses

import torch

from text import ClipLConfig, ClipLTextEncoder, OpenClipConfig, OpenClipTextEncoder
from unet import UNetConfig, UNetModel
from vae import AutoencoderKL, VAEConfig

from .model import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX


def tiny_state_dict(version: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """An original-layout state dict (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`)
    of a two-level UNet, a two-level VAE and a small text encoder that still takes the real CLIP vocabulary."""
    if version not in ("sd1", "sd2"):
        raise ValueError(f"version must be 'sd1' or 'sd2', got {version!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if version == "sd1":
            text = ClipLTextEncoder(ClipLConfig.tiny())
            unet_cfg = UNetConfig.tiny_sd1()
        else:
            text = OpenClipTextEncoder(OpenClipConfig.tiny())
            unet_cfg = UNetConfig.tiny_sd2()
        unet = UNetModel(dataclasses.replace(unet_cfg, context_dim=text.config.width))
        vae = AutoencoderKL(VAEConfig.tiny())
    out: dict[str, torch.Tensor] = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIX, text)):
        out.update({prefix + k: v.detach().clone() for k, v in module.state_dict().items()})
    return out

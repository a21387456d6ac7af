"""Tiny SD1/SD2/SDXL-shaped checkpoints with random weights, in the original file layout: for tests and demos."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from text import ClipLConfig, ClipLTextEncoder, OpenClipConfig, OpenClipTextEncoder, SDXLTextConfig, SDXLTextEncoder
from unet import UNetConfig, UNetModel
from vae import AutoencoderKL, VAEConfig

from .model import UNET_PREFIX, VAE_PREFIX, text_prefix


def tiny_state_dict(version: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """An original-layout state dict (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` or,
    for SDXL, `conditioner.*`) of a two-level UNet, a two-level VAE and small text encoder(s) that still take the
    real CLIP vocabulary. The SDXL one keeps SDXL's shape: no attention on the first level, two transformer
    blocks on the second, two res blocks per level, linear projections, and y = pooled text + 6 x 256."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        parts = tiny_parts(version)
    return {prefix + k: v.detach().clone() for prefix, module in parts.items() for k, v in module.state_dict().items()}


def tiny_parts(version: str = "sd1") -> dict[str, nn.Module]:
    """The modules of tiny_state_dict, {part prefix: module}, drawn from the global RNG (on the meta device when
    built under `torch.device("meta")`)."""
    if version not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"version must be 'sd1', 'sd2' or 'sdxl', got {version!r}")
    if version == "sd1":
        text = ClipLTextEncoder(ClipLConfig.tiny())
        unet_cfg = UNetConfig.tiny_sd1()
    elif version == "sd2":
        text = OpenClipTextEncoder(OpenClipConfig.tiny())
        unet_cfg = UNetConfig.tiny_sd2()
    else:
        text = SDXLTextEncoder(SDXLTextConfig.tiny())
        unet_cfg = tiny_sdxl_unet(text.config)
    unet = UNetModel(dataclasses.replace(unet_cfg, context_dim=text.config.width))
    vae = AutoencoderKL(VAEConfig.tiny())
    return {UNET_PREFIX: unet, VAE_PREFIX: vae, text_prefix(version): text}


def tiny_sdxl_unet(text: SDXLTextConfig) -> UNetConfig:
    """A test-sized UNet laid out like SDXL's, reading the given text encoders' context and y widths. As in SDXL
    (and as diffusers can express), the middle block is as deep as the last level."""
    return UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(False, True),
                      transformer_depth=(0, 2), transformer_depth_middle=2, context_dim=text.width, num_heads=None,
                      head_dim=64, use_linear_in_transformer=True, adm_in_channels=text.adm_in_channels)

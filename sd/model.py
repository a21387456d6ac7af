"""StableDiffusion: the loaded parts of one checkpoint (UNet, VAE, text encoder, tokenizer, schedule) in one object."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lora

from schedule import DDPMSchedule
from text import CLIPTokenizer
from unet import UNetModel
from vae import AutoencoderKL

from .checkpoint import write_state_dict

# Where each part lives in an original LDM checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."

VERSIONS = ("sd1", "sd2")


@dataclass
class StableDiffusion:
    """Everything needed to encode prompts, denoise latents and decode images for one SD 1.x/2.x model.

    `state_dict()` gives the original checkpoint keys, so `save()` writes a file other SD tools open.
    """

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    version: str
    prediction_type: str
    scale_factor: float = 0.18215
    tokenizer: CLIPTokenizer = field(default_factory=CLIPTokenizer)
    schedule: DDPMSchedule | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.schedule is None:
            self.schedule = DDPMSchedule(prediction_type=self.prediction_type)

    @property
    def parts(self) -> dict[str, nn.Module]:
        """The three networks by checkpoint prefix."""
        return {UNET_PREFIX: self.unet, VAE_PREFIX: self.vae, TEXT_PREFIX: self.text_encoder}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for module in self.parts.values():
            module.to(device=device, dtype=dtype)
        return self

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids [B, 77], padded the way this model's text encoder was trained."""
        return self.tokenizer(prompts, pad_id=self.text_encoder.pad_id)

    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Cross-attention context [B, 77, context_dim] for the UNet."""
        tokens = self.tokenize(prompts).to(next(self.text_encoder.parameters()).device)
        return self.text_encoder(tokens)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> latents sampled from the VAE posterior, times the scale factor."""
        return self.vae.encode(images).sample(generator) * self.scale_factor

    def decode_latents(self, latents: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
        """Latents (scaled) -> images in about [-1, 1]."""
        return self.vae.decode(latents / self.scale_factor, slice_size=slice_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under their original checkpoint keys. Live LoRA layers are folded in at their
        current scale, so the file computes what this model computes."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in self.parts.items():
            out.update({prefix + k: v for k, v in lora.base_state_dict(module, merged=True).items()})
        return out

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write an original-layout .safetensors or .ckpt (by extension), atomically."""
        tensors = self.state_dict()
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        metadata = {"modelspec.prediction_type": "v" if self.prediction_type == "v_prediction" else "epsilon",
                    "sd.version": self.version}
        return write_state_dict(path, tensors, metadata)

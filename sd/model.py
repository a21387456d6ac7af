"""StableDiffusion: the loaded parts of one checkpoint (UNet, VAE, text encoder(s), tokenizer, schedule) in one object."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from schedule import DDPMSchedule
from text import CLIPTokenizer, vector_conditioning
from unet import UNetModel
from vae import AutoencoderKL

from .checkpoint import write_state_dict

# Where each part lives in an original LDM checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
# SDXL (sgm) keeps its text towers under a "conditioner": embedders.0 CLIP-L, embedders.1 OpenCLIP bigG.
SDXL_TEXT_PREFIX = "conditioner."

VERSIONS = ("sd1", "sd2", "sdxl")


def text_prefix(version: str) -> str:
    """Where a family's text encoder(s) live in the file."""
    return SDXL_TEXT_PREFIX if version == "sdxl" else TEXT_PREFIX


@dataclass
class StableDiffusion:
    """Everything needed to encode prompts, denoise latents and decode images for one SD 1.x/2.x/XL model.

    `state_dict()` gives the original checkpoint keys, so `save()` writes a file other SD tools open.
    For SDXL, `text_encoder` is an SDXLTextEncoder (both towers) and the UNet also takes y (`vector`).
    SDXL's VAE overflows in float16 (NaN/inf images): sd.load keeps it in float32 when asked for float16; a
    later .to(dtype=torch.float16) would cast it too, so use bfloat16 there or move the VAE back.
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
        return {UNET_PREFIX: self.unet, VAE_PREFIX: self.vae, self.text_prefix: self.text_encoder}

    @property
    def text_prefix(self) -> str:
        return text_prefix(self.version)

    @property
    def needs_y(self) -> bool:
        """True when the UNet takes the extra conditioning vector y (SDXL)."""
        return self.unet.cfg.adm_in_channels is not None

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

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, 77], padded the way this model's text encoder was trained; for SDXL one tensor per tower."""
        if self.version == "sdxl":
            return self.text_encoder.tokenize(self.tokenizer, prompts)
        return self.tokenizer(prompts, pad_id=self.text_encoder.pad_id)

    def encode_text(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, 77, context_dim], pooled [B, D]) for the UNet; pooled is None for SD1/SD2."""
        device = next(self.text_encoder.parameters()).device
        if self.version == "sdxl":
            tokens_l, tokens_g = self.tokenize(prompts)
            return self.text_encoder(tokens_l.to(device), tokens_g.to(device))
        return self.text_encoder(self.tokenize(prompts).to(device)), None

    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Cross-attention context [B, 77, context_dim] for the UNet (SDXL: use encode_text for the pooled part too)."""
        return self.encode_text(prompts)[0]

    def vector(self, pooled: torch.Tensor | None, original_size, crop_top_left=(0, 0),
               target_size=None) -> torch.Tensor | None:
        """The UNet's y for SDXL (pooled text + size embeddings, see text.vector_conditioning); None for SD1/SD2.
        Sizes are in pixels, (height, width) / (top, left): one pair for the batch or a [B, 2] tensor."""
        if not self.needs_y:
            return None
        if pooled is None:
            raise ValueError("this model's UNet takes y: pass the pooled text vector from encode_text")
        return vector_conditioning(pooled, original_size, crop_top_left, target_size)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> latents sampled from the VAE posterior, times the scale factor."""
        images = images.to(next(self.vae.parameters()).dtype)  # the SDXL VAE may be kept in float32 (see sd.load)
        return self.vae.encode(images).sample(generator) * self.scale_factor

    def decode_latents(self, latents: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
        """Latents (scaled) -> images in about [-1, 1]."""
        latents = latents.to(next(self.vae.parameters()).dtype)
        return self.vae.decode(latents / self.scale_factor, slice_size=slice_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under their original checkpoint keys, as the three parts hold them. LoRA layers are not
        this object's business: fold them in first (lora.remove(part, merge=True)), or take
        lora.merged_state_dict(model), which folds them in at their current scale and leaves the model as it is."""
        return {prefix + k: v for prefix, module in self.parts.items() for k, v in module.state_dict().items()}

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write an original-layout .safetensors or .ckpt (by extension), atomically: `tensors` (original keys,
        e.g. lora.merged_state_dict(model)), by default state_dict()."""
        tensors = self.state_dict() if tensors is None else tensors
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        metadata = {"modelspec.prediction_type": "v" if self.prediction_type == "v_prediction" else "epsilon",
                    "sd.version": self.version}
        return write_state_dict(path, tensors, metadata)

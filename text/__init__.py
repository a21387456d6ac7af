"""Prompt -> context for SD: the CLIP tokenizer, SD1's CLIP-L, SD2's OpenCLIP ViT-H, and SDXL's pair of them."""

from __future__ import annotations

import torch
from torch import nn

from .clip_l import ClipLConfig, ClipLTextEncoder
from .open_clip import OpenClipConfig, OpenClipTextEncoder
from .sdxl import SDXLTextConfig, SDXLTextEncoder, size_embedding, vector_conditioning
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIPTokenizer",
    "ClipLConfig",
    "ClipLTextEncoder",
    "OpenClipConfig",
    "OpenClipTextEncoder",
    "SDXLTextConfig",
    "SDXLTextEncoder",
    "encode_prompts",
    "size_embedding",
    "vector_conditioning",
]


def encode_prompts(encoder: nn.Module, tokenizer: CLIPTokenizer, prompts: str | list[str]) -> torch.Tensor:
    """Context [B, 77, width] for prompts, padded the way this encoder was trained (encoder.pad_id).

    Gradients flow as usual; wrap in torch.no_grad() when the text encoder is frozen.
    """
    device = next(encoder.parameters()).device
    return encoder(tokenizer(prompts, pad_id=encoder.pad_id).to(device))

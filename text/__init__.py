"""Prompt -> context for SD: the CLIP tokenizer and the two text encoders (SD1 CLIP-L, SD2 OpenCLIP ViT-H)."""

from __future__ import annotations

import torch
from torch import nn

from .clip_l import ClipLConfig, ClipLTextEncoder
from .open_clip import OpenClipConfig, OpenClipTextEncoder
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIPTokenizer",
    "ClipLConfig",
    "ClipLTextEncoder",
    "OpenClipConfig",
    "OpenClipTextEncoder",
    "encode_prompts",
]


def encode_prompts(encoder: nn.Module, tokenizer: CLIPTokenizer, prompts: str | list[str]) -> torch.Tensor:
    """Context [B, 77, width] for prompts, padded the way this encoder was trained (encoder.pad_id).

    Gradients flow as usual; wrap in torch.no_grad() when the text encoder is frozen.
    """
    device = next(encoder.parameters()).device
    return encoder(tokenizer(prompts, pad_id=encoder.pad_id).to(device))

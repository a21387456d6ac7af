"""What several test files share: a UNet config that exercises the block arithmetic, and seeded random weights."""
from __future__ import annotations

import torch
from torch import nn

import lora
from unet import UNetConfig

# Two res blocks per level, a level without attention and depth 2: exercises the block numbering.
RICH = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(False, True, True),
                  transformer_depth=(0, 2, 1), transformer_depth_middle=1, context_dim=48, num_heads=None,
                  head_dim=32, use_linear_in_transformer=True)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights of a sensible scale (fan-in scaled matrices, norms near 1), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5 if p.ndim > 1
                    else 1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def randomize_lora(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero A and B in every LoRA layer: with B = 0, as initialised, every comparison would pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            packed = isinstance(layer, lora.PackedLoRA)  # OpenCLIP's q/k/v: an A and a B per third
            for p in layer.adapter_parameters() if packed else (layer.lora_down.weight, layer.lora_up.weight):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def captioned_circles(folder, colours, captions) -> None:
    """32 px images of one circle each, slightly different in size, with a caption file beside each image."""
    from PIL import Image, ImageDraw
    folder.mkdir()
    for i, (colour, caption) in enumerate(zip(colours, captions)):
        im = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(im).ellipse([4 + i, 4, 26, 26 - i], fill=colour)
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)


def train_argv(world: dict, out, **options) -> list[str]:
    """train.py's command line for a run on a test world (tiny checkpoint, its images and cache) in fp32."""
    base = {"ckpt": world["ckpt"], "images": world["images"], "cache": world["cache"], "resolution": 32,
            "out": str(out), "precision": "fp32", "batch_size": 2, "lr": 3e-3, "rank": 4, "toy_eval": False,
            "seed": 0}
    base.update(options)
    return [f"--{k}={v}" for k, v in base.items()]


# Layers an adapter wraps: a Linear and the conv kinds SD has (1x1, 3x3, 3x3 with stride 2), 24 -> 40 channels.
BASES = {
    "linear": lambda: nn.Linear(24, 40),
    "conv1x1": lambda: nn.Conv2d(24, 40, 1),
    "conv3x3": lambda: nn.Conv2d(24, 40, 3, padding=1),
    "conv3x3s2": lambda: nn.Conv2d(24, 40, 3, stride=2, padding=1),
}


def base_input(base: nn.Module, conv_batch: int = 3) -> torch.Tensor:
    """A seeded input for one of BASES: [3, 5, 24] tokens for a Linear, [conv_batch, 24, 9, 9] for a conv."""
    g = torch.Generator().manual_seed(7)
    if isinstance(base, nn.Linear):
        return torch.randn(3, 5, 24, generator=g)
    return torch.randn(conv_batch, 24, 9, 9, generator=g)

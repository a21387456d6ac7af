"""The held-out denoising loss: the same images, timesteps and noise at every evaluation, so that one run's curve,
and different runs, compare exactly (the validation loss sd-scripts users ask for: issue #193, PRs #1165, #1898).

Held-out images come from a folder (--validation_images) or from the training images themselves
(--validation_split: a seeded fraction that training then never sees).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import LatentLoader, encode_dataset

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of n cached images: round(fraction·n) of them, at least 1, chosen by
    the seed; fraction 0 holds out none."""
    if not fraction:
        return list(range(n)), []
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"validation_split: {fraction:g} of {n} images leaves none to train on")
    held = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def held_out_batches(cache, batch_size: int = 8, seed: int = 0, only: Sequence[int] | None = None) -> list:
    """The held-out batches, each image once, in file order, posterior means, no flips. cache: a LatentCache or
    its folder."""
    loader = LatentLoader(cache, batch_size=batch_size, seed=seed, shuffle=False, flip=False, sample=False,
                          only=only)
    return [loader.batch(i) for i in range(loader.steps_per_epoch)]


def encoded_batches(model, images: str | Path, cache: str | Path, resolution: int, seed: int,
                    batch_size: int = 8) -> list:
    """A folder of held-out captioned images, encoded once into `cache` (model: an sd.StableDiffusion or its
    checkpoint path), as held_out_batches."""
    encode_dataset(images, cache, model, resolution=resolution, seed=seed)
    return held_out_batches(cache, batch_size, seed)


def plain_condition(model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, y) of an SD1/SD2 batch: its token ids through the text encoder (as it is now, LoRA included)."""
    return model.text_encoder(batch.tokens.to(next(model.text_encoder.parameters()).device)), None


@torch.no_grad()
def held_out_loss(model, batches: Sequence, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
                  condition: Callable | None = None, unet=None) -> list[float]:
    """The mean denoising loss (MSE to the eps or v target) over every held-out image at each fixed timestep, with
    noise fixed by (seed, batch, t): deterministic. condition(batch) -> (context, y) (default: plain_condition);
    unet: the network to evaluate (default model.unet)."""
    unet = unet or model.unet
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    condition = condition or (lambda b: plain_condition(model, b))
    schedule = model.schedule
    totals = [0.0] * len(timesteps)
    count = 0
    for b, batch in enumerate(batches):
        latents = batch.latents.to(device)
        context, y = condition(batch)
        context = context.to(device, dtype)
        n = latents.shape[0]
        for j, t in enumerate(timesteps):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b * 1009 + int(t))
            noise = torch.randn(latents.shape, generator=g).to(device)
            tt = torch.full((n,), int(t), device=device, dtype=torch.long)
            noisy = schedule.add_noise(latents, noise, tt).to(dtype)
            pred = unet(noisy, tt, context) if y is None else unet(noisy, tt, context, y)
            target = schedule.target(latents, noise, tt)
            totals[j] += float(F.mse_loss(pred.float(), target.float(), reduction="sum")) / latents[0].numel()
        count += n
    return [x / max(1, count) for x in totals]

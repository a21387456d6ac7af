"""Training batches from a latent cache: one bucket per batch, seeded shuffles, a fresh posterior sample every step,
and any step reproducible on its own, so training resumes exactly where it stopped."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .cache import DataError, LatentCache


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, scale: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw z = mean + exp(logvar / 2) * noise from the stored VAE posterior, times the latent scale factor
    (0.18215 for SD 1.x/2.x): float32, what the UNet is trained on. Noise comes from `generator` on the CPU."""
    mean, logvar = mean.float(), logvar.float()
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return (mean + torch.exp(0.5 * logvar) * noise) * scale


def _step_seed(seed: int, step: int) -> int:
    """A 64-bit seed for one step that depends only on (seed, step): no state carries from step to step."""
    return int(np.random.SeedSequence([seed, step, 0x5A17]).generate_state(1, np.uint64)[0])


@dataclass
class Batch:
    """One training step's data. All images share one bucket, so `latents` stacks without padding."""

    step: int
    epoch: int
    latents: torch.Tensor                # [B, C, h, w] float32: sampled, already multiplied by the scale factor
    tokens: torch.Tensor                 # [B, 77] int64, for a text encoder that is being trained
    context: torch.Tensor | None         # [B, 77, D] float32 frozen text-encoder output, if the cache stores it
    captions: list[str]
    files: list[str]
    indices: list[int]                   # item indices in the cache
    flipped: list[bool]
    bucket: tuple[int, int]              # (width, height) in pixels
    original_sizes: list[tuple[int, int]]
    crops: list[tuple[int, int]]         # (top, left) of each crop in its resized image
    # SDXL only (None otherwise): what the UNet's y is built from (see sd.StableDiffusion.vector).
    tokens_g: torch.Tensor | None = None           # [B, 77] int64, padded for the second tower (OpenCLIP bigG)
    pooled: torch.Tensor | None = None             # [B, 1280] float32 frozen pooled text, if the cache stores it
    size_conditioning: torch.Tensor | None = None  # [B, 6] float32: original h, w, crop top, left, target h, w
    # With masks in the cache (None otherwise): per-pixel loss weights at latent size, 1 for images without a mask.
    mask: torch.Tensor | None = None               # [B, 1, h, w] float32 in [0, 1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Tensors moved to `device`; floating tensors cast to `dtype` if given."""
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
        tensors = ("latents", "tokens", "context", "tokens_g", "pooled", "size_conditioning", "mask")
        return Batch(**{**self.__dict__, **{name: move(getattr(self, name)) for name in tensors}})


class LatentLoader:
    """Batches of one bucket each, in an order fixed by (seed, epoch); every step is a pure function of
    (seed, step), so `iterate(start_step=k)` yields exactly the tail of a run started at step 0.

    Each image appears `repeats` times per epoch (its folder's repeat count). With flip (default: when the
    cache has mirror images) each draw picks the mirrored latents with probability 1/2. sample=False uses the
    posterior mean instead of a random draw. The scale factor is applied here, so batch.latents go straight
    into the noising step.
    """

    def __init__(self, cache: LatentCache | str | os.PathLike, batch_size: int, seed: int = 0, shuffle: bool = True,
                 flip: bool | None = None, sample: bool = True, drop_last: bool = False,
                 only: Sequence[int] | None = None):
        """only: the cache items to use (indices into cache.items, e.g. a training/validation split); None: all."""
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        self.indices = list(range(len(self.cache.items))) if only is None else sorted(set(only))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if flip and not self.cache.has_flip:
            raise DataError(f"{self.cache.folder}: flip asked for but the cache holds no mirrored latents; "
                            "encode with --flip")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.flip = self.cache.has_flip if flip is None else flip
        self.sample, self.drop_last = sample, drop_last
        self.scale = self.cache.scale_factor
        per_bucket: dict[tuple[int, int], int] = {}
        for i in self.indices:
            item = self.cache.items[i]
            per_bucket[item.bucket] = per_bucket.get(item.bucket, 0) + item.repeats
        rounding = math.floor if drop_last else math.ceil
        self.steps_per_epoch = sum(int(rounding(n / batch_size)) for n in per_bucket.values())
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.cache.folder}: no bucket has {batch_size} samples, so drop_last leaves no batch; "
                            f"bucket sizes are {dict(sorted(per_bucket.items()))}")
        self._plan: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The item indices of every batch of an epoch, in order."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        samples = np.repeat(np.array(self.indices, dtype=np.int64),
                            [self.cache.items[i].repeats for i in self.indices])
        if self.shuffle:
            samples = rng.permutation(samples)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in samples.tolist():
            by_bucket.setdefault(self.cache.items[index].bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plan = (epoch, batches)
        return batches

    def batch(self, step: int) -> Batch:
        """The batch of global step `step` (0-based, counting across epochs)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, position = divmod(step, self.steps_per_epoch)
        indices = self.epoch_plan(epoch)[position]
        generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
        # Coins are drawn even with flipping off, so a step's noise is the same either way.
        coins = torch.rand(len(indices), generator=generator) < 0.5
        flipped = [bool(c) and self.flip for c in coins]
        moments = [self.cache.moments(i, "flip" if f else "plain") for i, f in zip(indices, flipped)]
        mean = torch.stack([m for m, _ in moments])
        logvar = torch.stack([v for _, v in moments])
        if self.sample:
            latents = sample_latents(mean, logvar, self.scale, generator)
        else:
            latents = mean.float() * self.scale
        contexts = [self.cache.context(i) for i in indices] if self.cache.has_context else None
        items = [self.cache.items[i] for i in indices]
        xl = self.cache.version == "sdxl"
        sizes = ([self.cache.size_conditioning(i, "flip" if f else "plain") for i, f in zip(indices, flipped)]
                 if self.cache.has_size_conditioning else None)
        masks = None
        if self.cache.has_masks:
            ones = torch.ones(1, *latents.shape[2:])
            masks = [self.cache.mask(i, "flip" if f else "plain") for i, f in zip(indices, flipped)]
            masks = torch.stack([ones if m is None else m.float() for m in masks])
        return Batch(
            step=step, epoch=epoch, latents=latents, mask=masks,
            tokens=torch.stack([self.cache.tokens(i) for i in indices]).long(),
            context=torch.stack(contexts).float() if contexts is not None else None,
            captions=[it.caption for it in items], files=[it.file for it in items], indices=list(indices),
            flipped=flipped, bucket=items[0].bucket, original_sizes=[it.original_size for it in items],
            crops=[it.crop for it in items],
            tokens_g=torch.stack([self.cache.tokens_g(i) for i in indices]).long() if xl else None,
            pooled=torch.stack([self.cache.pooled(i) for i in indices]).float() if self.cache.has_pooled else None,
            size_conditioning=torch.stack(sizes) if sizes is not None else None,
        )

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
        """Batches for steps start_step, start_step + 1, ... (num_steps of them, or without end)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1

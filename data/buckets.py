"""Aspect-ratio buckets, and the resize-then-crop that fits an image to its bucket, computed from image sizes alone."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

Size = tuple[int, int]  # (width, height) in pixels, the order Pillow uses

CROPS = ("center", "random")


def parse_resolution(value: int | str | Sequence[int]) -> Size:
    """512 -> (512, 512); "512,768" or "512x768" or (512, 768) -> (width 512, height 768)."""
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").split(",")
        try:
            numbers = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise ValueError(f"resolution must be N or W,H (e.g. 512 or 512,768), got {value!r}") from None
    elif isinstance(value, int):
        numbers = [value]
    else:
        numbers = [int(v) for v in value]
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) <= 0:
        raise ValueError(f"resolution must be one or two positive integers (width, height), got {value!r}")
    return numbers[0], numbers[1]


def side_limits(resolution: Size, step: int, min_side: int | None = None, max_side: int | None = None) -> tuple[int, int]:
    """Default bucket side range: half the shorter side to twice the longer one (256..1024 at 512), on the step grid."""
    lo = min_side if min_side is not None else max(step, min(resolution) // 2 // step * step)
    hi = max_side if max_side is not None else max(resolution) * 2 // step * step
    if lo <= 0 or hi < lo or lo % step or hi % step:
        raise ValueError(f"bucket side limits must be multiples of the step {step} with 0 < min <= max, got min={lo}, max={hi}")
    return lo, hi


def bucket_sizes(resolution: Size, step: int = 64, min_side: int | None = None, max_side: int | None = None) -> list[Size]:
    """All buckets for a target resolution: for each width on the step grid, the tallest height on the grid whose
    area stays within width*height of the resolution, and the same turned 90 degrees (so portrait and landscape
    images get mirrored choices). Sorted from tallest to widest."""
    lo, hi = side_limits(resolution, step, min_side, max_side)
    area = resolution[0] * resolution[1]
    buckets = set()
    for width in range(lo, hi + 1, step):
        height = min(hi, area // width // step * step)
        if height >= lo:
            buckets.update({(width, height), (height, width)})
    if not buckets:
        raise ValueError(f"no bucket fits resolution {resolution} with step {step} and sides in [{lo}, {hi}]")
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's, measured as |log ratio| so that 2:1 and 1:2 are
    equally far from 1:1. Among equally close buckets the largest wins."""
    target = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def own_bucket(size: Size, resolution: Size, step: int, max_side: int | None = None) -> Size | None:
    """The bucket for "never upscale": the image itself, shrunk to the target area if larger, with each side
    rounded down to the step grid. None when a side would round down to nothing (the image is too small)."""
    width, height = size
    area = resolution[0] * resolution[1]
    if width * height > area:
        shrink = math.sqrt(area / (width * height))
        width, height = width * shrink, height * shrink
    bw, bh = int(width) // step * step, int(height) // step * step
    if max_side is not None:
        bw, bh = min(bw, max_side), min(bh, max_side)
    if bw < step or bh < step:
        return None
    return bw, bh


@dataclass(frozen=True)
class Placement:
    """How one image becomes one training crop: resize to `resized`, then cut `bucket` at (top, left)."""

    bucket: Size
    resized: Size
    crop: tuple[int, int]  # (top, left) in the resized image, the order SDXL's crop conditioning uses


def place(size: Size, bucket: Size, crop: str = "center", rng: random.Random | None = None) -> Placement:
    """Scale so the image just covers the bucket (aspect kept), then centre or random crop the excess."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    (width, height), (bw, bh) = size, bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    if crop == "center":
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        rng = rng or random.Random()
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    return Placement(bucket=(bw, bh), resized=(rw, rh), crop=(top, left))


def apply(image: Image.Image, placement: Placement) -> Image.Image:
    """Resize (Lanczos) and crop an RGB image as planned."""
    if image.size != placement.resized:
        # reducing_gap first shrinks by an integer factor with a box filter: far faster on big photos, same look.
        image = image.resize(placement.resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
    top, left = placement.crop
    bw, bh = placement.bucket
    return image.crop((left, top, left + bw, top + bh))


@dataclass(frozen=True)
class Geometry:
    """Everything that decides which pixels of an image get encoded. A cache is only valid for one Geometry.

    resolution: target (width, height); with bucketing only its area matters. Without bucketing every image
          is cropped to exactly this size, which must suit the model (a multiple of 8 for SD; checked when the
          model is loaded).
    step: with bucketing, bucket sides are multiples of this. 64 is the SD convention (sd-scripts' default);
          any multiple of the VAE factor works (8 for SD, 2 for the tiny test model).
    no_upscale: each image gets a bucket of its own size (shrunk to the target area if larger), never enlarged.
    crop: "center", or "random" with offsets drawn once per image from `seed` and the image's content hash.
    """

    resolution: Size = (512, 512)
    bucket: bool = False
    step: int = 64
    min_side: int | None = None
    max_side: int | None = None
    no_upscale: bool = False
    crop: str = "center"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", parse_resolution(self.resolution))
        if not isinstance(self.step, int) or self.step <= 0:
            raise ValueError(f"bucket step must be a positive integer, got {self.step!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.no_upscale and not self.bucket:
            raise ValueError("no_upscale needs bucketing (bucket=True): a fixed square would have to enlarge small images")
        if self.bucket:
            side_limits(self.resolution, self.step, self.min_side, self.max_side)

    def buckets(self) -> list[Size]:
        if not self.bucket:
            return [self.resolution]
        return bucket_sizes(self.resolution, self.step, self.min_side, self.max_side)

    def plan(self, size: Size, key: str, buckets: Sequence[Size] | None = None) -> Placement | None:
        """Placement of an image of `size`; `key` (its content hash) seeds a random crop so re-runs agree.
        None when the image is too small to fill even one step with no_upscale."""
        if self.no_upscale:
            _, hi = side_limits(self.resolution, self.step, self.min_side, self.max_side)
            bucket = own_bucket(size, self.resolution, self.step, hi)
            if bucket is None:
                return None
        else:
            bucket = nearest_bucket(size, buckets if buckets is not None else self.buckets())
        rng = random.Random(f"{self.seed}:{key}") if self.crop == "random" else None
        return place(size, bucket, self.crop, rng)

    def to_json(self) -> dict:
        lo_hi = side_limits(self.resolution, self.step, self.min_side, self.max_side) if self.bucket else (None, None)
        return {"resolution": list(self.resolution), "bucket": self.bucket, "step": self.step if self.bucket else None,
                "min_side": lo_hi[0], "max_side": lo_hi[1], "no_upscale": self.no_upscale,
                "crop": self.crop, "seed": self.seed if self.crop == "random" else None}

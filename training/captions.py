"""Captions that change every step: tag shuffling with the first tags kept in place, and tag dropout, as sd-scripts'
--shuffle_caption, --keep_tokens and --caption_tag_dropout_rate do for comma-separated tag captions.

    "sks dog, on a beach, sunset, film grain"   keep_tokens 1  ->  "sks dog, film grain, sunset"   (one draw)

The latent cache holds one text embedding per caption, so a varied caption is tokenized and sent through the frozen
text encoder at every step (train.py): the encoder stays in memory and costs one forward per step (CLIP-L: about
0.5 GFLOP per caption, small beside the UNet's). Caching several variants instead would bound the variety by what was
cached; with N tags a shuffle has N! orders.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def vary_caption(caption: str, g: torch.Generator, shuffle: bool = False, keep_tokens: int = 0,
                 tag_dropout: float = 0.0, separator: str = ",") -> str:
    """The caption's tags (split at `separator`, stripped): the first `keep_tokens` in place, the rest shuffled
    (shuffle) and each dropped with probability tag_dropout; joined with ", "."""
    tags = [t.strip() for t in caption.strip().split(separator)]
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle and len(flex) > 1:
        flex = [flex[i] for i in torch.randperm(len(flex), generator=g).tolist()]
    if tag_dropout:
        kept = (torch.rand(len(flex), generator=g) >= tag_dropout).tolist()
        flex = [t for t, k in zip(flex, kept) if k]
    return ", ".join(fixed + flex)


def vary_captions(captions: Sequence[str], seed: int, index: int, shuffle: bool, keep_tokens: int,
                  tag_dropout: float) -> list[str]:
    """vary_caption for a micro-batch, drawn from a generator seeded by (seed, micro-batch index): a resumed run
    draws the same captions."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index + 7_919)
    return [vary_caption(c, g, shuffle, keep_tokens, tag_dropout) for c in captions]

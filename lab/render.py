"""Rendering at the page's settings: each column's weights W0 + c·ΔW_k written into the model, then the same seeds.

For a layer of the column's adapter, c = scale · (alpha / alpha_file) where its group and kind are switched on (else
0), and ΔW_k is its update cut to rank k (rank.best_rank_k). Every other adapted weight goes back to W0, so a column
shows one adapter alone and the base column the model as it was loaded.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np
import torch

from sampling import generate, to_uint8

from .rank import best_rank_k
from .settings import Settings
from .state import Lab, LayerUpdate


def layer_rank(layer: LayerUpdate, settings: Settings) -> int | None:
    """The k this layer is cut to: its own from layer_ranks, else the global one (None: not cut)."""
    return settings.layer_ranks.get(layer.name, settings.rank)


def layer_factor(layer: LayerUpdate, settings: Settings) -> float:
    """c in W0 + c·ΔW_k: the multiplier times the alpha re-scaling, or 0 where the layer's group or kind is off."""
    if layer.group not in settings.groups or layer.kind not in settings.kinds:
        return 0.0
    alpha = 1.0 if settings.alpha is None else settings.alpha / layer.alpha
    return settings.scale * alpha


def layer_delta(layer: LayerUpdate, settings: Settings) -> torch.Tensor:
    """c·ΔW_k shaped like the weight, float32."""
    delta = best_rank_k(layer.u, layer.s, layer.vh, layer_rank(layer, settings))
    return (layer_factor(layer, settings) * delta).view(layer.shape)


@torch.no_grad()
def apply(lab: Lab, column: int | None, settings: Settings) -> None:
    """Write the weights of one column: adapter `column` at `settings`, or the base (None) everywhere."""
    layers = lab.adapters[column].layers if column is not None else {}
    for name, (weight, w0) in lab.weights.items():
        layer = layers.get(name)
        if layer is None or layer_factor(layer, settings) == 0.0:
            weight.copy_(w0)
        else:
            weight.copy_((w0.float() + layer_delta(layer, settings)).to(weight.dtype))


@dataclass
class Column:
    """One column of the grid: an adapter (None: the base) at its settings (those of the page, with the column's
    own k when the page compares ranks), and the label drawn above it."""

    adapter: int | None
    settings: Settings
    label: str


def columns(lab: Lab, settings: Settings) -> list[Column]:
    """The grid's columns, left to right: the base if shown, then each chosen adapter (once per k of settings.ranks
    when given, else once at settings.rank)."""
    chosen = range(len(lab.adapters)) if settings.loras is None else settings.loras
    out = [Column(None, settings, "base")] if settings.base else []
    for i in chosen:
        for k in settings.ranks or [settings.rank]:
            s = replace(settings, rank=k if k is None or k < lab.adapters[i].max_rank else None)
            out.append(Column(i, s, column_label(lab, i, s)))
    return out


def column_label(lab: Lab, column: int | None, settings: Settings) -> str:
    """What a column shows, e.g. 'toy_lora · k=2 · ×1 · α=4' (k=r: not cut; α as in the file unless re-scaled)."""
    if column is None:
        return "base"
    adapter = lab.adapters[column]
    k = f"k={settings.rank}" if settings.rank is not None and settings.rank < adapter.max_rank else f"k=r={adapter.max_rank}"
    if settings.layer_ranks:
        k += f" ({len(settings.layer_ranks)} layer{'s' if len(settings.layer_ranks) > 1 else ''} set)"
    alphas = {layer.alpha for layer in adapter.layers.values()}
    alpha = (f"α={settings.alpha:g}" if settings.alpha is not None
             else f"α={alphas.pop():g}" if len(alphas) == 1 else "α=file")
    parts = [adapter.label, k, f"×{settings.scale:g}", alpha]
    off = [g for g in ("down", "mid", "up", "text") if g not in settings.groups
           and any(layer.group == g for layer in adapter.layers.values())]
    off += [k for k in ("attention", "conv") if k not in settings.kinds
            and any(layer.kind == k for layer in adapter.layers.values())]
    if off:
        parts.append("off: " + ",".join(off))
    return " · ".join(parts)


@dataclass
class Progress:
    """UNet calls made in the running render, out of those it needs (one per sampler step and column)."""

    done: int = 0
    total: int = 0
    running: bool = False


class Renderer:
    """Renders one request at a time (the weights are shared), counting UNet calls for the page's progress bar."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.lock = threading.Lock()
        self.progress = Progress()
        lab.model.unet.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.progress.done += 1

    def render(self, settings: Settings) -> list[tuple[Column, np.ndarray]]:
        with self.lock:
            cols = columns(self.lab, settings)
            self.progress = Progress(0, len(cols) * settings.steps, True)
            try:
                return render(self.lab, settings, cols)
            finally:
                self.progress.running = False


def render(lab: Lab, settings: Settings, cols: list[Column] | None = None) -> list[tuple[Column, np.ndarray]]:
    """(column, images) for each column: uint8 arrays [images, height, width, 3], the seeds settings.seed, +1, ...

    The weights are W0 again afterwards. Not thread-safe: the lab's model is shared (the server holds a lock)."""
    out = []
    try:
        for column in columns(lab, settings) if cols is None else cols:
            apply(lab, column.adapter, column.settings)
            images = generate(lab.model, [settings.prompt] * settings.images, settings.negative,
                              sampler=settings.sampler, steps=settings.steps, cfg=settings.cfg, seed=settings.seed,
                              height=lab.height, width=lab.width, progress=False)
            out.append((column, to_uint8(images).numpy()))
    finally:
        apply(lab, None, settings)
    return out

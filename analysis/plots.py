"""The analyses' figures, drawn with matplotlib's object API (no pyplot state, no display needed) and saved as PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _colours(n: int, cmap: str = "viridis") -> list:
    from matplotlib import colormaps
    cm = colormaps[cmap]
    return [cm(i / max(1, n - 1)) for i in range(n)]


def energy_curves(path: Path, spectra: Mapping[str, Mapping[str, np.ndarray]], fraction: float) -> None:
    """Per run: the cumulative energy of each layer's ΔW against k, coloured from first to last layer."""
    runs = list(spectra)
    fig = Figure(figsize=(5.5 * len(runs), 4))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        layers = list(spectra[run])
        for colour, layer in zip(_colours(len(layers)), layers):
            s = np.asarray(spectra[run][layer], dtype=np.float64)
            total = (s ** 2).sum()
            if total <= 0:
                continue
            ax.plot(np.arange(1, len(s) + 1), np.cumsum(s ** 2) / total, color=colour, lw=0.8, alpha=0.7)
        ax.axhline(fraction, color="red", ls="--", lw=1, label=f"{fraction:.0%} of ||ΔW||²")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k (top singular directions)")
        ax.set_ylabel("fraction of ||ΔW||_F² kept")
        ax.set_title(f"{run}: {len(layers)} layers (first → last: dark → light)", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _plain_log_y(ax) -> None:
    """A log y axis labelled 3, 10, 30 rather than 3×10^0."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def per_layer_points(path: Path, series: Mapping[str, Mapping[str, float]], ylabel: str, title: str,
                     logy: bool = False, order: Sequence[str] | None = None) -> None:
    """One marker per layer (x: its index in `order`, default the order first seen) for each run."""
    fig = Figure(figsize=(11, 4))
    ax = fig.subplots()
    order = list(order or [])
    for values in series.values():
        order += [k for k in values if k not in order]
    index = {k: i for i, k in enumerate(order)}
    for colour, (label, values) in zip(_colours(len(series), "tab10"), series.items()):
        ax.scatter([index[k] for k in values], list(values.values()), s=10, color=colour, label=label, alpha=0.8)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        _plain_log_y(ax)
    ax.legend(fontsize=8)
    _save(fig, path)


def grouped_bars(path: Path, groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str, title: str,
                 logy: bool = False) -> None:
    """Bars per group (x axis), one bar per series side by side."""
    n = max(1, len(series))
    fig = Figure(figsize=(max(6.0, 0.45 * len(groups) * max(1, n / 2) + 2), 4.2))
    ax = fig.subplots()
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (colour, (label, values)) in enumerate(zip(_colours(n, "tab10"), series.items())):
        ax.bar(x + (i - (n - 1) / 2) * width, values, width, label=label, color=colour)
    ax.set_xticks(x, list(groups), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if n > 1 or next(iter(series), ""):
        ax.legend(fontsize=8)
    _save(fig, path)


def heatmaps(path: Path, mats: Mapping[str, np.ndarray], xlabel: str, ylabel: str, vmax: float = 1.0,
             cols: int = 4) -> None:
    """A grid of heatmaps sharing one colour scale [0, vmax]; rows of each matrix go down the y axis."""
    n = len(mats)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols + 0.8, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    fig.subplots_adjust(hspace=0.55, wspace=0.35, right=0.88)
    image = None
    for ax, (title, m) in zip(axes, mats.items()):
        m = np.asarray(m, dtype=np.float64)
        image = ax.imshow(m, vmin=0, vmax=vmax, cmap="magma", aspect="auto", interpolation="nearest",
                          extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.91, 0.15, 0.015, 0.7)), label="φ")
    _save(fig, path)


def _draw_lines(ax, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                title: str, logx: bool, logy: bool, markers: bool, hlines: Mapping[str, float] | None) -> None:
    for colour, (label, (xs, ys)) in zip(_colours(len(series), "tab10"), series.items()):
        ax.plot(list(xs), list(ys), marker="o" if markers else None, ms=3, color=colour, label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="gray", ls="--", lw=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logx:
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log", base=2)
        ticks = sorted({float(x) for xs, _ in series.values() for x in xs})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def lines(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
          title: str, logx: bool = False, logy: bool = False, markers: bool = True,
          hlines: Mapping[str, float] | None = None) -> None:
    """One line per series, each given as (xs, ys); hlines: labelled horizontal reference lines.

    logx uses base 2 with the data's own x values as ticks (ranks are usually powers of two)."""
    fig = Figure(figsize=(6.5, 4.2))
    _draw_lines(fig.subplots(), series, xlabel, ylabel, title, logx, logy, markers, hlines)
    _save(fig, path)


def line_panels(path: Path, panels: Sequence[tuple[Mapping[str, tuple[Sequence[float], Sequence[float]]], str, str,
                                                   Mapping[str, float] | None]],
                xlabel: str, logx: bool = False) -> None:
    """Side-by-side line plots sharing an x axis; each panel is (series, ylabel, title, hlines) as for lines()."""
    fig = Figure(figsize=(5.2 * len(panels), 4.0))
    for ax, (series, ylabel, title, hlines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _draw_lines(ax, series, xlabel, ylabel, title, logx, False, True, hlines)
    _save(fig, path)


def histograms(path: Path, values: Mapping[str, Sequence[float]], xlabel: str, title: str,
               bins: int = 40, vlines: Sequence[float] = ()) -> None:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for colour, (label, v) in zip(_colours(len(values), "tab10"), values.items()):
        ax.hist(np.asarray(v, dtype=np.float64), bins=bins, range=(0, 1), alpha=0.5, color=colour, label=label)
    for v in vlines:
        ax.axvline(v, color="gray", ls=":", lw=1)
    ax.set_yscale("log")  # the interesting tail is a few vectors among thousands
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def matrix(path: Path, values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
           label: str) -> None:
    """One annotated heatmap with its own colour scale (e.g. runs x blocks)."""
    values = np.asarray(values, dtype=np.float64)
    fig = Figure(figsize=(max(6.0, 0.45 * len(col_labels) + 3), max(2.5, 0.35 * len(row_labels) + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(col_labels)), list(col_labels), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), list(row_labels), fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    _save(fig, path)


def bars_ci(path: Path, panels: Sequence[tuple[Sequence[str], Sequence[float], Sequence[float], str, float | None]],
            title: str) -> None:
    """One panel per metric: a bar per group at its mean, with its confidence interval as an error bar, and an
    optional dashed reference line (e.g. the base model's value). panels: (labels, means, half-widths, ylabel, ref)."""
    fig = Figure(figsize=(3.2 * max(1, len(panels)), 3.6))
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (labels, means, halves, ylabel, ref) in zip(axes, panels):
        x = np.arange(len(labels))
        ax.bar(x, means, yerr=halves, capsize=4, color=_colours(len(labels))[: len(labels)])
        if ref is not None:
            ax.axhline(ref, color="grey", ls="--", lw=1, label="base")
            ax.legend(fontsize=7)
        ax.set_xticks(x, labels, rotation=30, fontsize=8)
        ax.set_title(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)

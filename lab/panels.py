"""The numbers beside the images: a layer's singular values, the energy rank k keeps, and ‖ΔW‖_F per block.

The spectrum is the file's ΔW (multiplier 1, the file's alpha): the values `python -m analysis spectrum` reports.
The per-block norms are given both for the file and at the page's settings (scale, alpha, rank, blocks on/off),
from the singular values alone: ‖c·ΔW_k‖_F = |c|·sqrt(Σ_{i≤k} S_i²).
"""
from __future__ import annotations

import math
from typing import Any

from analysis.deltas import block_key

from .rank import energy_kept, frobenius_at_rank
from .render import layer_factor, layer_rank
from .settings import Settings
from .state import Lab


def spectrum_panel(lab: Lab, adapter: int, layer: str, settings: Settings) -> dict[str, Any]:
    """JSON for the page: the layer's spectrum and energy at its k, and ‖ΔW‖ per block of the adapter."""
    a = lab.adapters[adapter]
    ly = a.layers[layer]
    s = ly.s.double().cpu()
    k = layer_rank(ly, settings)
    k_used = ly.rank if k is None else min(k, ly.rank)
    blocks: dict[str, dict[str, Any]] = {}
    for other in a.layers.values():
        b = blocks.setdefault(other.block, {"block": other.block, "group": other.group, "file2": 0.0, "now2": 0.0})
        sv = other.s.double().cpu()
        b["file2"] += float((sv ** 2).sum())
        b["now2"] += (layer_factor(other, settings) * frobenius_at_rank(sv, layer_rank(other, settings))) ** 2
    rows = [{"block": b["block"], "group": b["group"], "file": math.sqrt(b["file2"]), "now": math.sqrt(b["now2"])}
            for b in sorted(blocks.values(), key=lambda b: block_key(b["block"]))]
    return {
        "adapter": a.label, "layer": ly.name, "block": ly.block, "shape": list(ly.shape), "kind": ly.adapter,
        "rank": ly.rank, "alpha": ly.alpha, "k": k_used,
        "singular_values": [float(x) for x in s],
        "fro": float(s.norm()), "energy_kept": energy_kept(s, k_used),
        "energy_curve": [energy_kept(s, i) for i in range(1, len(s) + 1)],
        "factor": layer_factor(ly, settings),
        "blocks": rows,
    }

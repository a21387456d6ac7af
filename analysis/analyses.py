"""The low-rank analyses of the LoRA literature, on runs (LoRA files or full fine-tunes) against their base.

    base = load_base("base.safetensors")
    runs = [load_run("r8/lora_final.safetensors", base), load_run("full/model_final.safetensors", base)]
    spectrum(runs).save("analysis/spectrum")       # singular values, stable rank, rank for 90% of the energy
    subspace(runs[0], other)                        # φ(A1, A2, i, j) of Hu et al. 2021, with a random control
    amplification(runs)                             # Table 7 of Hu et al. 2021
    intruders(runs)                                 # intruder dimensions (Shuttleworth et al. 2024)
    params("sd15", ranks=[4, 8, 64])                # d·k vs r·(d+k), per block

Each returns a Result: .rows (CSV), .summary (printed by .table()), .data (JSON), .figures (PNG), .save(folder).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import sd
from lora.inject import candidates, inject, named_lora_layers, remove
from lora.io import num_res_blocks
from lora.layer import lora_params
from lora.names import kohya_name
from sd.model import TEXT_PREFIX, UNET_PREFIX, text_prefix

from . import plots
from . import spectral as sp
from .deltas import TE, Delta, Run, block_key, block_of, common_layers, kind_of, select
from .results import Result

DEFAULT_EPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _shape(d: Delta) -> str:
    return "x".join(str(x) for x in d.shape)


def _layer(run: Run | None, d: Delta) -> dict[str, Any]:
    row = {"run": run.label} if run is not None else {}
    row.update(layer=d.name, block=block_of(d.name), kind=kind_of(d.name), shape=_shape(d))
    return row


def delta_svds(deltas: Sequence[Delta], vectors: bool = True, top: int | None = None, desc: str = "SVD",
               progress: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (U, S, Vh) of ΔW, or (S,) with vectors=False; U, Vh cut to `top` directions when given.

    LoRA updates go through their factors (never formed); dense ones are stacked by shape.
    """
    out: list[tuple[torch.Tensor, ...] | None] = [None] * len(deltas)
    low = [i for i, d in enumerate(deltas) if d.is_lora]
    dense = [i for i, d in enumerate(deltas) if not d.is_lora]

    def cut(u, s, vh):
        if not vectors:
            return (s,)
        return (u[..., :top], s, vh[..., :top, :]) if top else (u, s, vh)

    if low:
        res = sp.batched([deltas[i] for i in low], key=lambda d: (tuple(d.up.shape), tuple(d.down.shape)),
                         load=lambda d: (d.up, d.down, torch.tensor(d.scale, dtype=torch.float64)),
                         fn=lambda up, down, scale: cut(*sp.lowrank_svd(up, down, scale)), desc=desc,
                         progress=progress)
        for i, r in zip(low, res):
            out[i] = r
    if dense:
        fn = (lambda m: cut(*sp.svd(m))) if vectors else (lambda m: (sp.singular_values(m),))
        res = sp.batched([deltas[i] for i in dense], key=lambda d: d.matrix_shape, load=lambda d: (d.matrix(),),
                         fn=fn, desc=desc, progress=progress)
        for i, r in zip(dense, res):
            out[i] = r
    return out  # type: ignore[return-value]


def layer_order(runs: Sequence[Run]) -> list[str]:
    """Every run's layers in model order: the largest run's order, then what only the others have."""
    order: list[str] = []
    for run in sorted(runs, key=lambda r: -len(r.deltas)):
        order += [n for n in run.deltas if n not in order]
    return order


def short_name(name: str) -> str:
    """'input_blocks.1 attn1.to_q': block and role, for plot titles."""
    return f"{block_of(name)} {kind_of(name)}"


def _need_base(runs: Sequence[Run], what: str) -> None:
    for run in runs:
        if any(d.base is None for d in run.deltas.values()):
            raise ValueError(f"{what} compares with the base weights: load {run.path} with its base checkpoint "
                             "(--base)")


# ------------------------------------------------------------------------------------------ spectrum

def spectrum(runs: Sequence[Run], fraction: float = 0.9, keep: int = 128, progress: bool = True) -> Result:
    """Singular values of ΔW per layer, its stable rank and the rank that holds `fraction` of its energy.

    rank@0.9 is the measure of Biderman et al. (LoRA Learns Less and Forgets Less, 2024): full fine-tuning
    makes updates of high rank, a LoRA's are at most r. rel_fro = ||ΔW||_F / ||W0||_F when a base is known.
    """
    col = f"rank@{fraction:g}"
    rows, spectra, totals, summary = [], {}, {}, []
    for run in runs:
        deltas = list(run.deltas.values())
        svals = delta_svds(deltas, vectors=False, desc=f"{run.label}: spectra", progress=progress)
        spectra[run.label], totals[run.label] = {}, {}
        for d, (s,) in zip(deltas, svals):
            fro = float(s.norm())
            row = _layer(run, d)
            row.update(r=d.rank if d.is_lora else d.adapter, fro=fro, spectral=float(s[0]))
            if d.base is not None:
                row["rel_fro"] = fro / max(float(d.base.double().norm()), 1e-300)
            row.update({"stable_rank": float(sp.stable_rank(s)), col: int(sp.energy_rank(s, fraction)),
                        "numerical_rank": int(sp.numerical_rank(s)), "top1_energy": float(sp.energy(s)[0])})
            rows.append(row)
            spectra[run.label][d.name] = s.numpy()
            totals[run.label][d.name] = float((s ** 2).sum())
        for block in dict.fromkeys(block_of(d.name) for d in deltas):
            these = [r for r in rows if r["run"] == run.label and r["block"] == block]
            summary.append({"run": run.label, "block": block, "layers": len(these),
                            "fro": math.sqrt(sum(r["fro"] ** 2 for r in these)),
                            "stable_rank_median": statistics.median(r["stable_rank"] for r in these),
                            f"{col}_median": statistics.median(r[col] for r in these),
                            f"{col}_max": max(r[col] for r in these)})
    data = {"fraction": fraction, "singular_values": {run: {n: s[:keep] for n, s in layers.items()}
                                                      for run, layers in spectra.items()},
            "energy_total": totals, "kept_singular_values": keep}
    figures = {
        "spectrum_energy.png": lambda p: plots.energy_curves(p, spectra, fraction),
        "spectrum_ranks.png": lambda p: plots.per_layer_points(
            p, {run.label: {r["layer"]: r[col] for r in rows if r["run"] == run.label} for run in runs},
            f"rank holding {fraction:.0%} of ||ΔW||²", f"{col} per layer", logy=True, order=layer_order(runs)),
        "spectrum_norms.png": lambda p: _block_bars(p, summary, "fro", "||ΔW||_F per block"),
    }
    notes = [f"{col}: smallest k whose top-k singular directions hold {fraction:.0%} of ||ΔW||_F²; "
             "stable rank: ||ΔW||_F²/||ΔW||_2²; fro of a block: sqrt of the sum of its layers' ||ΔW||_F²."]
    return Result("spectrum", rows, summary, data, figures, notes)


def _block_bars(path, summary: list[dict], column: str, title: str, logy: bool = False) -> None:
    blocks = sorted(dict.fromkeys(r["block"] for r in summary), key=block_key)
    runs = list(dict.fromkeys(r["run"] for r in summary))
    values = {(r["run"], r["block"]): r[column] for r in summary}
    plots.grouped_bars(path, blocks, {run: [values.get((run, b), 0.0) for b in blocks] for run in runs},
                       column, title, logy=logy)


# ------------------------------------------------------------------------------------------ subspace

FACTORS = ("auto", "A", "B", "dW")


def _directions(run: Run, layers: Sequence[str], factor: str, rank: int | None, progress: bool) -> list[torch.Tensor]:
    """Orthonormal columns, most important first, spanning what `factor` says for each layer."""
    deltas = [run.deltas[n] for n in layers]
    if factor == "A":      # right singular vectors of A: the input directions the LoRA reads (Hu et al.)
        res = sp.batched(deltas, key=lambda d: tuple(d.down.shape), load=lambda d: (d.down,),
                         fn=lambda a: (sp.svd(a, method="lapack")[2],), desc=f"{run.label}: A", progress=progress)
        return [vh[:rank].mT for (vh,) in res]
    if factor == "B":      # left singular vectors of B: the output directions it writes
        res = sp.batched(deltas, key=lambda d: tuple(d.up.shape), load=lambda d: (d.up,),
                         fn=lambda b: (sp.svd(b, method="lapack")[0],), desc=f"{run.label}: B", progress=progress)
        return [u[:, :rank] for (u,) in res]
    # dW: top right singular vectors of the update itself (a full fine-tune has no A)
    top = rank or max(d.rank if d.is_lora else min(64, *d.matrix_shape) for d in deltas)
    res = delta_svds(deltas, top=top, desc=f"{run.label}: ΔW", progress=progress)
    out = []
    for d, (_, s, vh) in zip(deltas, res):
        k = rank or (d.rank if d.is_lora else min(64, *d.matrix_shape))
        k = min(k, int((s > 0).sum()) or 1)
        out.append(vh[:k].mT)
    return out


def subspace(run1: Run, run2: Run, factor: str = "auto", rank: int | None = None, common: bool = False,
             seed: int = 0, max_heatmaps: int = 16, progress: bool = True) -> Result:
    """Subspace similarity φ(i, j) = ||V1[:, :i]^T V2[:, :j]||_F² / min(i, j) per layer (Hu et al. 2021, sec. 7.2).

    factor "A" (default for two LoRAs): V are the right singular vectors of the A matrices; "B": left singular
    vectors of B; "dW" (default when a full fine-tune is involved): top right singular vectors of ΔW, `rank` of
    them (default: the LoRA's r, or 64). The control is φ between random subspaces of the same sizes, whose
    expectation is max(i, j)/n. Identical runs give φ = 1, orthogonal subspaces φ = 0.
    """
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    both_lora = all(d.is_lora for run in (run1, run2) for d in run.deltas.values())  # factors A, B to compare
    if factor == "auto":
        factor = "A" if both_lora else "dW"
    if factor in ("A", "B") and not both_lora:
        raise ValueError(f"factor {factor!r} needs two LoRAs (plain, factors B·A); {run1.label} is {run1.kind}, "
                         f"{run2.label} is {run2.kind}: use factor='dW' (the update's own singular vectors)")
    layers = common_layers([run1, run2], strict=not common)
    bad = [f"{n}: {_shape(run1.deltas[n])} vs {_shape(run2.deltas[n])}" for n in layers
           if run1.deltas[n].shape != run2.deltas[n].shape]
    if bad:
        raise ValueError(f"{run1.label} and {run2.label} are for different models (layer shapes differ): "
                         + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else ""))
    v1s = _directions(run1, layers, factor, rank, progress)
    v2s = _directions(run2, layers, factor, rank, progress)
    g = torch.Generator().manual_seed(seed)
    rows, phis, controls = [], {}, {}
    for name, v1, v2 in zip(layers, v1s, v2s):
        n, r1, r2 = v1.shape[0], v1.shape[1], v2.shape[1]
        phi = sp.subspace_similarity(v1, v2)
        rand = sp.subspace_similarity(sp.random_orthonormal((n, r1), g), sp.random_orthonormal((n, r2), g))
        expected = sp.expected_random_similarity(r1, r2, n)
        rmin = min(r1, r2)
        row = _layer(None, run1.deltas[name])
        row.update(dim=n, r1=r1, r2=r2, phi_1_1=float(phi[0, 0]), phi_min=float(phi[rmin - 1, rmin - 1]),
                   mean_phi=float(phi.mean()), random_mean_phi=float(rand.mean()),
                   expected_random_mean_phi=float(expected.mean()))
        rows.append(row)
        phis[name], controls[name] = phi.numpy(), rand.numpy()
    summary = []
    for block in dict.fromkeys(r["block"] for r in rows):
        these = [r for r in rows if r["block"] == block]
        summary.append({"block": block, "layers": len(these),
                        **{c: statistics.fmean(r[c] for r in these)
                           for c in ("phi_1_1", "phi_min", "mean_phi", "random_mean_phi", "expected_random_mean_phi")}})
    room = max(1, max_heatmaps - 1)  # one panel is the random control
    shown = layers if len(layers) <= room else \
        list(dict.fromkeys(layers[round(i * (len(layers) - 1) / max(1, room - 1))] for i in range(room)))
    notes = [f"φ between {run1.label} (i) and {run2.label} (j), factor {factor}: phi_1_1 = φ(1,1) (top direction), "
             "phi_min = φ(min r, min r), mean_phi over the whole grid; random_*: two random subspaces of the same "
             "sizes."]
    if len(shown) < len(layers):
        notes.append(f"heatmaps show {len(shown)} of {len(layers)} layers (choose with --layers); all are in the JSON.")

    def draw(path):
        mats = {}
        for n in shown:
            title = short_name(n)
            mats[title if title not in mats else n] = phis[n]
        mats[f"random control ({short_name(shown[0])})"] = controls[shown[0]]
        plots.heatmaps(path, mats, f"j ({run2.label})", f"i ({run1.label})")

    figures = {"subspace_heatmaps.png": draw,
               "subspace_layers.png": lambda p: plots.per_layer_points(
                   p, {"mean φ": {r["layer"]: r["mean_phi"] for r in rows},
                       "φ(1,1)": {r["layer"]: r["phi_1_1"] for r in rows},
                       "random mean φ": {r["layer"]: r["random_mean_phi"] for r in rows}},
                   "φ", f"subspace similarity per layer: {run1.label} vs {run2.label} ({factor})")}
    data = {"factor": factor, "runs": [run1.label, run2.label], "phi": phis, "random_phi": controls}
    return Result("subspace", rows, summary, data, figures, notes)


# ------------------------------------------------------------------------------------- amplification

def amplification(runs: Sequence[Run], ranks: Sequence[int] | None = None, seed: int = 0,
                  progress: bool = True) -> Result:
    """How strongly ΔW amplifies directions of W0 (Hu et al. 2021, sec. 7.3 and Table 7), per layer and r.

    For U, V the top-r singular directions of ΔW, of W0 itself, or random: ||U^T W0 V||_F. The amplification
    factor is ||ΔW||_F / ||U_ΔW^T W0 V_ΔW||_F. ranks: the r to project on (default: each LoRA layer's own r;
    4 and 64 for full fine-tunes).
    """
    _need_base(runs, "amplification")
    wanted: dict[str, set[int]] = {}
    per_run: list[dict[str, list[int]]] = []
    for run in runs:
        chosen = {}
        for n, d in run.deltas.items():
            rs = list(ranks) if ranks else ([d.rank] if d.is_lora else [4, 64])
            rs = sorted({min(int(r), *d.matrix_shape) for r in rs})
            chosen[n] = rs
            wanted.setdefault(n, set()).update(rs)
        per_run.append(chosen)
    top = max(max(v) for v in wanted.values())
    # W0's SVD once per layer, shared by the runs.
    owners = {}
    for run in runs:
        for n, d in run.deltas.items():
            owners.setdefault(n, d)
    names = list(owners)
    w_res = sp.batched([owners[n] for n in names], key=lambda d: d.matrix_shape, load=lambda d: (d.base_matrix(),),
                       fn=lambda w: (lambda u, s, vh: (u[..., :top], s, vh[..., :top, :]))(*sp.svd(w)),
                       desc="base SVD", progress=progress)
    w_svd = dict(zip(names, w_res))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for run, chosen in zip(runs, per_run):
        deltas = list(run.deltas.values())
        d_res = delta_svds(deltas, top=top, desc=f"{run.label}: ΔW SVD", progress=progress)
        for d, svd_d in zip(deltas, d_res):
            for entry in sp.amplification(svd_d, d.base_matrix(), chosen[d.name], g, w_svd[d.name]):
                rows.append({**_layer(run, d), **entry})
    summary = []
    keys = dict.fromkeys((r["run"], r["r"], r["kind"]) for r in rows)
    for run, r, kind in keys:
        these = [x for x in rows if x["run"] == run and x["r"] == r and x["kind"] == kind]
        summary.append({"run": run, "r": r, "kind": kind, "layers": len(these),
                        **{c: statistics.fmean(x[c] for x in these)
                           for c in ("proj_dW", "proj_W", "proj_random", "fro_W", "fro_dW", "amplification")}})
    notes = ["Table 7 of Hu et al. 2021, averaged over layers of each kind: ||U^T W V||_F for U, V the top-r "
             "directions of ΔW (proj_dW), of W (proj_W) and random (proj_random); amplification = fro_dW / proj_dW. "
             "A large factor with proj_dW << proj_W: ΔW amplifies directions that W barely uses."]

    def bars(path):
        blocks = sorted(dict.fromkeys(r["block"] for r in rows), key=block_key)
        labels = list(dict.fromkeys(f"{r['run']} r={r['r']}" for r in rows))
        series = {}
        for lab in labels:
            series[lab] = []
            for b in blocks:
                xs = [x["amplification"] for x in rows if f"{x['run']} r={x['r']}" == lab and x["block"] == b]
                series[lab].append(statistics.fmean(xs) if xs else 0.0)
        plots.grouped_bars(path, blocks, series, "||ΔW||_F / ||U^T W V||_F", "amplification factor per block (mean)",
                           logy=True)

    def projections(path):
        labels = [f"{s['run']} r={s['r']} {s['kind']}" for s in summary]
        plots.grouped_bars(path, labels, {"top-r of ΔW": [s["proj_dW"] for s in summary],
                                          "top-r of W": [s["proj_W"] for s in summary],
                                          "random": [s["proj_random"] for s in summary]},
                           "||U^T W V||_F", "W projected on r directions (Hu et al. Table 7)", logy=True)

    figures = {"amplification.png": bars, "amplification_projections.png": projections}
    return Result("amplification", rows, summary, {}, figures, notes)


# ------------------------------------------------------------------------------------------ intruders

def intruders(runs: Sequence[Run], top_k: int = 10, thresholds: Sequence[float] = DEFAULT_EPS, side: str = "left",
              common: bool = False, progress: bool = True) -> Result:
    """Intruder dimensions (Shuttleworth et al. 2024, LoRA vs Full Fine-tuning: An Illusion of Equivalence).

    Of the top_k singular vectors of W_tuned = W0 + ΔW, an intruder is one whose largest |cosine| with every
    singular vector of W0 is below ε; counted for each ε in `thresholds`. side: "left" (output space) or
    "right" (input space) singular vectors. Several runs (e.g. a LoRA and a full fine-tune) are compared on
    their own layers, or on the layers they share with common=True.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    _need_base(runs, "intruders")
    thresholds = sorted(float(t) for t in thresholds)
    names = common_layers(runs, strict=False) if common else list(dict.fromkeys(n for r in runs for n in r.deltas))
    items = [(n, tuple(i for i, r in enumerate(runs) if n in r.deltas)) for n in names]

    def vectors(u, vh, k=None):
        v = u if side == "left" else vh.mT
        return v[..., :k] if k else v

    def load(item):
        n, who = item
        first = runs[who[0]].deltas[n]
        return first.base_matrix(), torch.stack([runs[i].deltas[n].tuned_matrix() for i in who])

    def fn(w0, wt):
        u0, _, vh0 = sp.svd(w0)
        ut, _, vht = sp.svd(wt)
        k = min(top_k, ut.shape[-1])
        return (sp.best_cosines(vectors(ut, vht, k), vectors(u0, vh0)[:, None]),)

    res = sp.batched(items, key=lambda it: (runs[it[1][0]].deltas[it[0]].matrix_shape, it[1]), load=load, fn=fn,
                     desc="intruders", progress=progress)
    rows, best = [], {r.label: {} for r in runs}
    for (n, who), (b,) in zip(items, res):
        for j, i in enumerate(who):
            run, d = runs[i], runs[i].deltas[n]
            counts = sp.intruder_counts(b[j], thresholds)
            row = _layer(run, d)
            row.update(k=int(b.shape[-1]), min_best_cos=float(b[j].min()))
            row.update({f"intruders@{t:g}": c for t, c in zip(thresholds, counts)})
            rows.append(row)
            best[run.label][n] = b[j].numpy()
    summary = []
    for run in runs:
        these = [r for r in rows if r["run"] == run.label]
        for t in thresholds:
            c = [r[f"intruders@{t:g}"] for r in these]
            summary.append({"run": run.label, "eps": t, "layers": len(these), "intruders": sum(c),
                            "per_layer": sum(c) / max(1, len(c)), "layers_with_intruders": sum(x > 0 for x in c)})
    notes = [f"top {top_k} {side} singular vectors of W0 + ΔW whose best |cos| with all of W0's {side} singular "
             "vectors is below eps."]
    figures = {
        "intruders.png": lambda p: plots.lines(
            p, {run.label: (thresholds, [s["per_layer"] for s in summary if s["run"] == run.label]) for run in runs},
            "ε (cosine threshold)", f"intruders per layer (of top {top_k})", "intruder dimensions vs ε"),
        "intruders_cosines.png": lambda p: plots.histograms(
            p, {label: np.concatenate(list(v.values())) if v else np.zeros(0) for label, v in best.items()},
            f"best |cos| of W_tuned's top-{top_k} {side} singular vectors with W0's", "intruder candidates",
            vlines=[0.5]),
    }
    data = {"thresholds": thresholds, "top_k": top_k, "side": side, "best_cos": best}
    return Result("intruders", rows, summary, data, figures, notes)


# ------------------------------------------------------------------------------------------ params

MODEL_PRESETS = ("sd15", "sd1", "sd2", "tiny")


def meta_model(model: str) -> dict[str, torch.nn.Module]:
    """{'unet': ..., 'te': ...} built on the meta device (shapes only, no memory) from a preset or a checkpoint."""
    if model in MODEL_PRESETS:
        parts, text = sd.build_preset("sd1" if model == "sd15" else model), TEXT_PREFIX
    else:
        _, version, parts = sd.build_meta(model)  # only the header is read
        text = text_prefix(version)
    return {"unet": parts[UNET_PREFIX], "te": parts[text]}


def _file_bytes(layers: list[tuple[str, int, int, tuple]], bytes_per_param: int) -> int:
    """Size of a kohya safetensors file: 8-byte length, JSON header, data (factors + one float32 alpha each)."""
    header, offset = {}, 0
    code = {2: "F16", 4: "F32"}.get(bytes_per_param, "F16")
    for key, d, k, down_shape in layers:
        r = down_shape[0]
        for suffix, shape, size in ((".lora_down.weight", down_shape, r * k * bytes_per_param),
                                    (".lora_up.weight", (d, r) + ((1, 1) if len(down_shape) == 4 else ()),
                                     d * r * bytes_per_param),
                                    (".alpha", (), 4)):
            header[key + suffix] = {"dtype": code if suffix != ".alpha" else "F32", "shape": list(shape),
                                    "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def params(model: str = "sd15", ranks: Sequence[int] = (4, 8, 16, 64), targets: str | Sequence[str] = "attn",
           conv_rank: int | None = None, text_encoder: bool = False, bytes_per_param: int = 2) -> Result:
    """Trainable parameters and file size per block for LoRAs of each rank: d·k frozen vs r·(d+k) trained.

    model: "sd15"/"sd1", "sd2", "tiny", or a checkpoint path (only its shapes are read). targets as for
    lora.inject (a preset or patterns); text_encoder=True also counts a LoRA on the text encoder.
    """
    parts = meta_model(model)
    if not text_encoder:
        parts.pop("te")
    totals = {p: sum(x.numel() for x in m.parameters()) for p, m in parts.items()}
    nrb = num_res_blocks(parts["unet"])
    rows, summary, notes = [], [], []
    for rank in ranks:
        layers, per_block = [], {}
        for part, module in parts.items():
            try:
                inject(module, rank, None, targets, conv_rank=conv_rank)
            except ValueError:
                if part == "te":
                    notes.append(f"targets {targets!r} match no text-encoder layer")
                    continue
                raise
            for path, layer in named_lora_layers(module):
                dk, rdk = lora_params(layer.rank, layer)
                w = layer.weight
                d, k = w.shape[0], w[0].numel()
                block = block_of((TE if part == "te" else "") + path)
                row = per_block.setdefault(block, {"rank": rank, "block": block, "layers": 0, "frozen_dk": 0,
                                                   "lora_r_dk": 0})
                row["layers"] += 1
                row["frozen_dk"] += dk
                row["lora_r_dk"] += rdk
                try:
                    key = kohya_name(path, part, nrb if part == "unet" else None)
                except ValueError:  # a layer outside kohya's naming: the size estimate only needs some name
                    key = path
                layers.append((key, d, k, tuple(layer.lora_down.weight.shape)))
            remove(module)
        for row in per_block.values():
            row["ratio"] = row["lora_r_dk"] / row["frozen_dk"]
            row["MB"] = (row["lora_r_dk"] * bytes_per_param) / 2**20
            rows.append(row)
        trained = sum(r["lora_r_dk"] for r in per_block.values())
        frozen = sum(r["frozen_dk"] for r in per_block.values())
        summary.append({"rank": rank, "layers": len(layers), "frozen_dk": frozen, "lora_r_dk": trained,
                        "ratio": trained / max(1, frozen), "of_model": trained / sum(totals.values()),
                        "file_MB": _file_bytes(layers, bytes_per_param) / 2**20})
    example = _example_layer(parts["unet"], targets, ranks)
    if example:
        notes.insert(0, example)
    notes.append(f"{'fp16' if bytes_per_param == 2 else f'{bytes_per_param}-byte'} factors; file_MB is the size of "
                 "a kohya .safetensors without metadata; of_model: share of all parameters of "
                 + (" + ".join(parts)) + ".")
    blocks = list(dict.fromkeys(r["block"] for r in rows))

    def draw(path):
        series = {"frozen d·k": [next(r["frozen_dk"] for r in rows if r["block"] == b) for b in blocks]}
        for rank in ranks:
            series[f"r={rank}: r·(d+k)"] = [
                next((r["lora_r_dk"] for r in rows if r["block"] == b and r["rank"] == rank), 0) for b in blocks]
        plots.grouped_bars(path, blocks, series, "parameters", f"{model}: frozen vs trainable per block ({targets})",
                           logy=True)

    return Result("params", rows, summary, {"model": model, "targets": targets, "ranks": list(ranks)},
                  {"params.png": draw}, notes)


def _example_layer(unet: torch.nn.Module, targets, ranks: Sequence[int]) -> str:
    """One worked line for the first targeted layer: d·k vs r·(d+k)."""
    names = select([p for p, _ in candidates(unet)], targets)
    if not names:
        return ""
    w = unet.get_submodule(names[0]).weight
    d, k = w.shape[0], w[0].numel()
    parts = ", ".join(f"r={r}: {r * (d + k):,} ({r * (d + k) / (d * k):.1%})" for r in ranks)
    return f"e.g. {names[0]}: W is {d}x{k}, d·k = {d * k:,} frozen; r·(d+k) trained = {parts}"

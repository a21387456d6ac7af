"""Adapters compared on an equal budget of trainable parameters, over seeds, on the built-in toy.

    python -m analysis compare --adapters lora,dora,loha,lokr --rank 4 --seeds 0,1,2 --out runs/compare -- --steps 400

The LoRA at --rank sets the budget; every other adapter gets the rank (and, for LoKr, the factor) whose trainable
parameter count on the same target layers is closest to it, within --tolerance (default ±10%). Each adapter then
trains with train.py once per seed (analysis/sweep.py's machinery: same data, same latent cache, finished runs
reused) and is measured: the toy's concept and forgetting scores (train.py's scores.json), held-out denoising loss
(sweep's validation_loss), the rank holding 90% of ΔW's energy (mean over layers) and the intruder count (summed over
layers). Reported per adapter: mean ± 95% CI over seeds (Student's t with n − 1 degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lora
import sd

from . import plots
from .analyses import intruders, spectrum
from .deltas import load_base, load_run
from .results import Result
from .stats import aggregate, pm
from .sweep import DEFAULT_TIMESTEPS, _toy_val_images, toy_scores, train_points, validation_batches, validation_loss

ADAPTERS = ("lora", "dora", "loha", "lokr")
LOKR_FACTORS = (-1, 2, 4, 8, 16, 32)
METRICS = (("concept_score", "concept score (higher: learnt)"),
           ("forgetting_score", "forgetting score (lower: forgotten)"),
           ("val_loss", "held-out denoising loss"),
           ("rank90", "rank for 90% of ||ΔW||² (mean over layers)"),
           ("intruders", "intruder dimensions (sum over layers)"))


def trainable_count(unet: torch.nn.Module, adapter: str, rank: int, targets: str | list[str],
                    options: dict[str, Any] | None = None) -> int:
    """Trainable parameters of `adapter` at `rank` on `targets` (lora.inject, counted, removed again)."""
    name = "_budget"
    lora.inject(unet, rank, None, targets, adapter=adapter, name=name, dtype=torch.float32, **(options or {}))
    try:
        return sum(p.numel() for p in lora.lora_parameters(unet, name))
    finally:
        lora.remove(unet, name)


def match_budget(unet: torch.nn.Module, adapters: Sequence[str], rank: int, targets: str | list[str],
                 tolerance: float = 0.1, full: bool = False) -> list[dict[str, Any]]:
    """Per adapter the setting whose trainable count is closest to the LoRA's at `rank`: {"adapter", "rank",
    "options", "params", "params_vs_lora"}. Ranks 1..4·rank are tried (and LoKr's factors); ties go to the lower
    rank. ValueError when the closest is further than `tolerance` (a fraction) from the budget."""
    budget = trainable_count(unet, "lora", rank, targets)
    out = []
    for adapter in adapters:
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter {adapter!r} is not one of {', '.join(ADAPTERS)}")
        if adapter == "lora":
            tries = [(rank, {})]
        elif adapter == "lokr":
            tries = [(r, {"factor": f}) for f in LOKR_FACTORS for r in range(1, 4 * rank + 1)]
        else:
            tries = [(r, {}) for r in range(1, 4 * rank + 1)]
        counted = [(abs(n - budget), r, opts, n) for r, opts in tries
                   for n in [trainable_count(unet, adapter, r, targets, opts)]]
        _, r, opts, n = min(counted, key=lambda c: (c[0], c[1]))
        if abs(n - budget) > tolerance * budget:
            raise ValueError(f"{adapter}: no setting within ±{tolerance:.0%} of the LoRA budget ({budget} parameters "
                             f"at rank {rank}); the closest is rank {r}{''.join(f' {k}={v}' for k, v in opts.items())} with {n}. "
                             f"Try another --rank or "
                             f"--tolerance")
        out.append({"adapter": adapter, "rank": r, "options": opts, "params": n, "params_vs_lora": n / budget - 1})
    if full:
        n = sum(p.numel() for p in unet.parameters())
        out.append({"adapter": "full", "rank": None, "options": {}, "params": n, "params_vs_lora": n / budget - 1})
    return out


def setting_label(s: dict[str, Any]) -> str:
    if s["adapter"] == "full":
        return "full fine-tune" + "".join(f" {k}={v:g}" for k, v in s["options"].items())
    return f"r={s['rank']}" + "".join(f" {k}={v}" for k, v in s["options"].items())


def _point_args(s: dict[str, Any], seed: int, full_lr: float = 1e-4) -> list[str]:
    if s["adapter"] == "full":
        return ["--mode=full", f"--lr={full_lr:g}", f"--seed={seed}"]
    args = ["--mode=lora", f"--adapter={s['adapter']}", f"--rank={s['rank']}", f"--seed={seed}"]
    if "factor" in s["options"]:
        args.append(f"--lokr_factor={s['options']['factor']}")
    return args


def measure_run(path: str, base, model, batches, timesteps, seed: int, epsilon: float) -> dict[str, float]:
    """val_loss, rank90 and intruders of one trained file (an adapter file, or a full checkpoint)."""
    run = load_run(path, base, progress=False)
    if run.kind == "full":
        tuned = sd.load(path, dtype=torch.float32)
        vals = validation_loss(tuned, batches, timesteps, seed)
    else:
        parts = {"unet": model.unet, "text_encoder": model.text_encoder}
        lora.load(path, parts, name="compare")
        try:
            vals = validation_loss(model, batches, timesteps, seed)
        finally:
            for module in parts.values():
                lora.remove(module, "compare")
    ranks = [r["rank@0.9"] for r in spectrum([run], fraction=0.9, progress=False).rows]
    found = intruders([run], thresholds=[epsilon], progress=False).rows
    return {"val_loss": float(np.mean(vals)), "rank90": float(np.mean(ranks)),
            "intruders": float(sum(r[f"intruders@{epsilon:g}"] for r in found))}


def compare(adapters: Sequence[str], rank: int, seeds: Sequence[int], train_args: Sequence[str], out: str | Path, *,
            full: bool = False, full_lr: float = 1e-4, tolerance: float = 0.1, epsilon: float = 0.5,
            timesteps: Sequence[int] = DEFAULT_TIMESTEPS, val_images: str | Path | None = None) -> Result:
    """Match the budgets, train adapter × seed with train.py (finished runs reused), measure, and aggregate."""
    from training.config import parse_args

    out = Path(out)
    cfg = parse_args(list(train_args))
    cfg.validate()
    base = load_base(cfg.ckpt, text_encoder=False, dtype=torch.float32)
    from train import lora_targets
    settings = match_budget(base.model.unet, adapters, rank, lora_targets(cfg), tolerance, full)
    if full:
        settings[-1]["options"] = {"lr": full_lr}
    budget = settings[0]["params"] / (1 + settings[0]["params_vs_lora"])
    print("equal budget (LoRA r=%d on %s: %d trainable parameters):" % (rank, cfg.targets, round(budget)))
    for s in settings:
        print(f"  {s['adapter']:6s} {setting_label(s):22s} {s['params']:>9d} parameters ({s['params_vs_lora']:+.1%})")
    points = [{"name": f"{s['adapter']}_s{seed}", "adapter": s["adapter"], "seed": int(seed),
               "args": _point_args(s, seed, full_lr), "setting": s} for s in settings for seed in seeds]
    points, cfg = train_points(points, train_args, out)
    val_images = val_images or _toy_val_images(cfg, out)
    model = sd.load(cfg.ckpt, dtype=torch.float32)
    batches = validation_batches(model, val_images, out / "val_cache", cfg.resolution, cfg.seed)
    base_val = float(np.mean(validation_loss(model, batches, timesteps, cfg.seed)))
    runs = []
    for p in points:
        s = p["setting"]
        row = {"adapter": p["adapter"], "setting": setting_label(s), "params": s["params"], "seed": p["seed"],
               "status": p["status"], "dir": p["dir"]}
        if p["status"] in ("ok", "reused"):
            row.update(toy_scores(p["dir"]) or {})
            row.update(measure_run(p["final"], base, model, batches, timesteps, cfg.seed, epsilon))
        runs.append(row)
    names = [m for m, _ in METRICS]
    rows = aggregate(runs, ["adapter", "setting", "params"], names)
    for r, s in zip(rows, settings):
        r["params_vs_lora"] = s["params_vs_lora"]
    summary = [{"adapter": "base", "setting": "", "params": 0, "n": "", "val_loss": f"{base_val:.4g}"}]
    for r in rows:
        summary.append({"adapter": r["adapter"], "setting": r["setting"], "params": r["params"], "n": r["n"],
                        **{m: pm(r[m], r[f"{m}_ci95"]) for m in names if m in r}})
    notes = [f"mean ± 95% CI over {len(seeds)} seeds (Student's t, n − 1 degrees of freedom); equal budget: "
             f"LoRA r={rank} = {round(budget)} trainable parameters, each adapter within ±{tolerance:.0%}. "
             f"val_loss: held-out toy images at t = {list(timesteps)}; rank90: mean over layers of the rank holding "
             f"90% of ||ΔW||_F²; intruders: singular vectors of W0 + ΔW (top 10) with |cos| < {epsilon:g} to every "
             f"one of W0, summed over layers. Runs and their train.py commands: {out}/<adapter>_s<seed>/, "
             "compare.json."]
    data = {"settings": settings, "runs": runs, "base_val_loss": base_val, "budget": budget, "seeds": list(seeds),
            "train_args": list(train_args), "commands": {p["name"]: p["command"] for p in points}}
    return Result("compare", rows, summary, data, {"compare.png": lambda path: _plot(path, rows, base_val)}, notes)


def _plot(path: Path, rows: list[dict[str, Any]], base_val: float) -> None:
    panels = []
    for m, label in METRICS:
        have = [r for r in rows if m in r]
        if have:
            panels.append(([r["adapter"] for r in have], [r[m] for r in have],
                           [0.0 if math.isnan(r[f"{m}_ci95"]) else r[f"{m}_ci95"] for r in have], label,
                           base_val if m == "val_loss" else None))
    plots.bars_ci(path, panels, "equal trainable-parameter budget: mean ± 95% CI over seeds")

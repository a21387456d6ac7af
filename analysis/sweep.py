"""A grid of LoRA trainings (rank × alpha × scaling rule × learning rate × seed) on the same data and seeds.

    python -m analysis sweep --rank 4,16,64 --alpha rank,16 --rule r,sqrt --lr 1e-4,3e-4 --out runs/sweep \\
        --val-images held_out/ --prompts "a photo of sks dog|sks dog on a beach" \\
        -- --ckpt base.safetensors --images data/

Everything after `--` goes to train.py unchanged (the grid's values override it). Each run trains into
<out>/<run name>/ (finished runs are reused), then all are measured against the same base: final training
loss, validation loss on held-out images at fixed timesteps and noise, ||ΔW||_F per block, and sample grids;
on the built-in toy checkpoint also the concept and forgetting scores that train.py wrote to <run>/scores.json.
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lora
import sd
from lora.inject import named_lora_layers
from sampling import generate, grid as image_grid, to_pil

from training.validation import DEFAULT_TIMESTEPS, encoded_batches, held_out_loss

from . import plots
from .deltas import TE, block_key, block_of
from .results import Result
from .stats import aggregate, pm

RULES = {"r": False, "alpha/r": False, "sqrt": True, "alpha/sqrt(r)": True, "rs": True}


@dataclass
class SweepGrid:
    """The axes of the grid. alpha "rank" means alpha = r (scale 1 under alpha/r); rules: "r" or "sqrt"."""

    ranks: list[int] = field(default_factory=lambda: [4, 16])
    alphas: list[float | str] = field(default_factory=lambda: ["rank"])
    rules: list[str] = field(default_factory=lambda: ["r"])
    lrs: list[float] | None = None  # None: train.py's --lr (its recipe's, on the built-in toy) for every run
    seeds: list[int] | None = None  # None: train.py's --seed for every run

    def points(self, default_seed: int, default_lr: float = 1e-4) -> list[dict[str, Any]]:
        for rule in self.rules:
            if rule not in RULES:
                raise ValueError(f"scaling rule {rule!r} is not one of {sorted(RULES)}")
        for a in self.alphas:
            if a != "rank" and (not isinstance(a, (int, float)) or a <= 0):
                raise ValueError(f"alpha must be a positive number or 'rank', got {a!r}")
        lrs = self.lrs or [default_lr]
        if any(r < 1 for r in self.ranks) or any(lr <= 0 for lr in lrs):
            raise ValueError(f"ranks must be >= 1 and learning rates > 0, got {self.ranks}, {lrs}")
        seeds = self.seeds or [default_seed]
        out = []
        for rank, alpha, rule, lr, seed in itertools.product(self.ranks, self.alphas, self.rules, lrs, seeds):
            rs = RULES[rule]
            a = float(rank) if alpha == "rank" else float(alpha)
            name = f"r{rank}_a{'=r' if alpha == 'rank' else f'{a:g}'}_{'sqrt' if rs else 'lin'}_lr{lr:g}"
            if len(seeds) > 1:
                name += f"_s{seed}"
            out.append({"name": name, "rank": int(rank), "alpha": a,
                        "alpha_label": "r" if alpha == "rank" else f"{a:g}",
                        "rule": "alpha/sqrt(r)" if rs else "alpha/r", "rs": rs, "scale": a / (math.sqrt(rank) if rs else rank), "lr": float(lr), "seed": int(seed)})
        names = [p["name"] for p in out]
        if len(set(names)) != len(names):
            raise ValueError(f"the grid repeats a point: {names}")
        return out


def _train_args(point: dict[str, Any]) -> list[str]:
    """A grid point's own train.py options."""
    return [f"--rank={point['rank']}", f"--alpha={point['alpha']}", f"--rs={point['rs']}", f"--lr={point['lr']}",
            f"--seed={point['seed']}", "--mode=lora"]


def train_grid(grid: SweepGrid, train_args: Sequence[str], out: str | Path) -> tuple[list[dict[str, Any]], Any]:
    """Train every grid point not already trained in <out>/<name>/; return the points (with status) and the config."""
    from training.config import parse_args

    cfg = parse_args(list(train_args))
    cfg.validate()
    points = grid.points(cfg.seed, cfg.lr)
    for point in points:
        point["args"] = _train_args(point)
    return train_points(points, train_args, out)


def train_points(points: list[dict[str, Any]], train_args: Sequence[str], out: str | Path
                 ) -> tuple[list[dict[str, Any]], Any]:
    """Run train.py for every point ({"name", "args": its own train.py options}) into <out>/<name>/, all on the
    same data and latent cache; a finished run with the same config is reused (status "reused"), another config
    in the folder is an error. Each point gets "dir", "final" (its file), "command" and "status"."""
    import train
    from training.config import parse_args

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = parse_args(list(train_args))
    cfg.validate()
    extra = list(train_args)
    if not cfg.images:
        extra.append(f"--images={_toy_images(cfg, out)}")
    cache = cfg.cache or str(out / "cache")
    for i, point in enumerate(points):
        argv = extra + [f"--out={out / point['name']}", *point["args"], f"--cache={cache}"]
        want = parse_args(argv)
        folder = out / point["name"]
        final = folder / ("lora_final.safetensors" if want.mode == "lora" else "model_final.safetensors")
        want = want.to_dict()
        point.update(dir=str(folder), final=str(final), command="python train.py " + shlex.join(argv))
        if final.is_file() and (folder / "config.yaml").is_file():
            have = json.loads((folder / "config.yaml").read_text())
            if have == want:
                point["status"] = "reused"
                continue
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise ValueError(f"{folder} holds a run with another config (differs in {diff}); use another --out")
        for stale in ("log.jsonl", "scores.json"):  # an unfinished earlier attempt: drop its log and scores
            if (folder / stale).is_file():
                (folder / stale).unlink()
        print(f"\n=== run {i + 1}/{len(points)}: {point['name']} ===", flush=True)
        rc = train.main(argv)
        point["status"] = "ok" if rc == 0 and final.is_file() else f"failed (exit {rc})"
    return points, cfg


def _toy_images(cfg, out: Path) -> Path:
    """train.py's default data (the toy concept images), written once for every run to share."""
    from toy.hooks import concept_images, is_builtin_toy
    if not is_builtin_toy(cfg.ckpt):
        raise ValueError("images: no image folder given (-- --images DIR); only the built-in toy checkpoint has "
                         "default images")
    return concept_images(cfg.toy_concept, cfg.toy_images, out)


def _toy_val_images(cfg, out: Path) -> Path:
    """Held-out toy images: the same concept drawn with another seed."""
    from toy import world
    from toy.hooks import is_builtin_toy, write_folder_once
    if not is_builtin_toy(cfg.ckpt):
        raise ValueError("pass --val-images DIR: held-out images with captions, encoded like the training images")
    folder = out / f"toy_{cfg.toy_concept}_val_images"
    return write_folder_once(folder, *world.concept_dataset(cfg.toy_concept, cfg.toy_images, seed=cfg.seed + 1000))


# -------------------------------------------------------------------------------------------- measuring

def validation_batches(model, images: str | Path, cache: str | Path, resolution: int, seed: int,
                       batch_size: int = 8) -> list:
    """Held-out images encoded once (posterior means, no flips, file order): the same inputs for every run.

    model: the base (sd.StableDiffusion) before any LoRA is applied, or its checkpoint path."""
    return encoded_batches(model, images, cache, resolution, seed, batch_size)


def validation_loss(model, batches: Sequence, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                    seed: int = 0) -> list[float]:
    """The denoising loss on every held-out image at each fixed timestep, with noise fixed by (seed, batch, t).

    Returns the mean loss per timestep: deterministic, so runs (and the base) compare exactly (what train.py's
    --validation_images logs during training, training/validation.py)."""
    return held_out_loss(model, batches, timesteps, seed)


def train_losses(folder: str | Path) -> list[float]:
    path = Path(folder) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


SCORES = ("concept_score", "forgetting_score")


def toy_scores(folder: str | Path) -> dict[str, float] | None:
    """The toy world's scores that train.py wrote to <run>/scores.json (built-in toy checkpoint with toy_eval),
    as {'concept_score', 'forgetting_score'} of the trained model plus 'concept_base', 'forgetting_base' of its
    base; None when the run has no scores.json."""
    path = Path(folder) / "scores.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    try:
        out = {key: float(data["trained"][key]) for key in SCORES}
        out.update({key.replace("_score", "_base"): float(data["base"][key]) for key in SCORES})
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: expected {{'base': {{...}}, 'trained': {{...}}}} with {SCORES}; {err!r}") from err
    return out


def block_norms(model_parts: dict[str, torch.nn.Module], name: str) -> dict[str, float]:
    """||ΔW||_F per block of adapter `name` (sqrt of the sum of its layers' squared norms)."""
    out: dict[str, float] = {}
    for part, module in model_parts.items():
        for path, layer in named_lora_layers(module, name):
            block = block_of((TE if part == "text_encoder" else "") + path)
            out[block] = out.get(block, 0.0) + float(layer.lora_weight().double().norm() ** 2)
    return {b: math.sqrt(v) for b, v in out.items()}


def sweep(grid: SweepGrid, train_args: Sequence[str], out: str | Path, *, val_images: str | Path | None = None,
          prompts: Sequence[str] = (), timesteps: Sequence[int] = DEFAULT_TIMESTEPS, sample_steps: int = 20,
          sample_cfg: float = 5.0, tail: float = 0.1) -> Result:
    """Train the grid (reusing finished runs), then measure every run against the same base and held-out data.

    final_train_loss: mean of the last `tail` fraction of logged steps (single steps are noisy).
    val_loss: validation_loss() averaged over `timesteps`, on `val_images` (held-out captioned images; the toy
    checkpoint draws its own). dW.<block>: ||ΔW||_F of each block. prompts: one sample grid, a row per run.
    concept_score, forgetting_score (and their base values): from each run's scores.json when train.py wrote one
    (the built-in toy checkpoint with toy_eval on).
    """
    out = Path(out)
    points, cfg = train_grid(grid, train_args, out)
    val_images = val_images or _toy_val_images(cfg, out)
    model = sd.load(cfg.ckpt, dtype=torch.float32)
    batches = validation_batches(model, val_images, out / "val_cache", cfg.resolution, cfg.seed)
    parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    base_val = validation_loss(model, batches, timesteps, cfg.seed)
    size = cfg.resolution

    def sample() -> list:
        return to_pil(generate(model, list(prompts), steps=sample_steps, cfg=sample_cfg, seed=cfg.seed, height=size,
                               width=size, progress=False))

    images = {"base": sample()} if prompts else {}
    rows, curves, per_t = [], {}, {"base": base_val}
    blocks_all: list[str] = []
    for p in points:
        row = {k: p[k] for k in ("name", "rank", "alpha", "alpha_label", "rule", "scale", "lr", "seed", "status")}
        losses = train_losses(p["dir"])
        curves[p["name"]] = losses
        if losses:
            n = max(1, int(round(len(losses) * tail)))
            row.update(steps=len(losses), final_train_loss=float(np.mean(losses[-n:])), last_train_loss=losses[-1])
        scores = toy_scores(p["dir"]) if p["status"] in ("ok", "reused") else None
        if scores:
            row.update(scores)
        if p["status"] in ("ok", "reused"):
            lora.load(Path(p["dir"]) / "lora_final.safetensors", parts, name="sweep")
            vals = validation_loss(model, batches, timesteps, cfg.seed)
            per_t[p["name"]] = vals
            norms = block_norms(parts, "sweep")
            blocks_all += [b for b in norms if b not in blocks_all]
            row.update(val_loss=float(np.mean(vals)), val_vs_base=float(np.mean(vals) - np.mean(base_val)),
                       dW_fro=math.sqrt(sum(v ** 2 for v in norms.values())))
            row.update({f"dW.{b}": v for b, v in norms.items()})
            if prompts:
                images[p["name"]] = sample()
            for module in parts.values():
                lora.remove(module, "sweep")
        rows.append(row)
    main_cols = ("name", "rank", "alpha_label", "rule", "scale", "lr", "seed", "status", "final_train_loss", "val_loss",
                 "val_vs_base", "dW_fro")
    scored = [r for r in rows if "concept_score" in r]
    base_row: dict[str, Any] = {"val_loss": float(np.mean(base_val))}
    notes = [f"val_loss: mean denoising loss on {sum(len(b.files) for b in batches)} held-out images "
             f"({val_images}) at t = {list(timesteps)}, fixed noise; final_train_loss: mean of the last "
             f"{tail:.0%} of logged steps. Runs and train.py commands: {out}/<name>/, sweep.json."]
    base_scores = None
    if scored:
        main_cols += SCORES
        # train.py scores the base with each run's seed: one base row when every run saw the same numbers.
        bases = {tuple(r[k.replace("_score", "_base")] for k in SCORES) for r in scored}
        if len(bases) == 1:
            base_scores = dict(zip(SCORES, bases.pop()))
            base_row.update(base_scores)
        notes.append("concept_score: fraction of concept-prompt samples that show the concept (higher: learnt); "
                     "forgetting_score: colour+shape accuracy on base-world prompts (lower than base: forgotten). "
                     "From each run's scores.json" + ("." if base_scores else
                                                       "; base values differ per seed: concept_base, "
                                                       "forgetting_base in sweep.csv."))
    blank = {("alpha" if k == "alpha_label" else k): "" for k in main_cols}
    summary = [{**blank, "name": "base", "status": "base", **base_row}] + \
        [{("alpha" if k == "alpha_label" else k): r[k] for k in main_cols if k in r} for r in rows]
    figures = _figures(rows, curves, per_t, sorted(blocks_all, key=block_key), base_val, list(timesteps),
                       base_scores)
    if images:
        labels = list(images)

        def draw_samples(path):
            flat = [im for label in labels for im in images[label]]
            if flat[0].width < 128:  # tiny models: enlarge so that labels fit and pixels stay visible
                f = math.ceil(128 / flat[0].width)
                flat = [im.resize((im.width * f, im.height * f), resample=0) for im in flat]
            image_grid(flat, cols=len(prompts), col_labels=[p[:24] for p in prompts], row_labels=labels).save(path)

        figures["sweep_samples.png"] = draw_samples
    data = {"points": points, "timesteps": list(timesteps), "val_loss_per_timestep": per_t, "train_loss": curves,
            "train_args": list(train_args), "val_images": str(val_images), "prompts": list(prompts)}
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) > 1:  # several seeds: the table gives each configuration's mean ± 95% CI; the CSV gets both
        metrics = ["final_train_loss", "val_loss", "val_vs_base", "dW_fro", *SCORES]
        means = aggregate(rows, ["rank", "alpha_label", "rule", "scale", "lr"], metrics)
        for m in means:
            m.update(name=f"r{m['rank']}_a={m['alpha_label']}_{'sqrt' if 'sqrt' in m['rule'] else 'lin'}_lr{m['lr']:g}",
                     seed=f"mean of {m['n']}", status="mean ± 95% CI")
        summary = summary[:1] + [
            {("alpha" if k == "alpha_label" else k): (pm(m[k], m.get(f"{k}_ci95", math.nan), 4) if k in metrics
                                                       else m.get(k, "")) for k in main_cols} for m in means]
        data["mean_ci"] = means
        rows = rows + means
        notes.append(f"mean ± 95% CI over seeds {seeds} (Student's t, n − 1 degrees of freedom) per configuration; "
                     "the per-seed rows are in sweep.csv above the mean rows (seed 'mean of n', *_ci95 columns).")
    return Result("sweep", rows, summary, data, figures, notes)


def _figures(rows, curves, per_t, blocks, base_val, timesteps, base_scores=None) -> dict:
    done = [r for r in rows if "val_loss" in r]
    scored = [r for r in rows if "concept_score" in r]

    def val_vs_rank(path):
        series: dict[str, tuple[list, list]] = {}
        seeds = len({r["seed"] for r in done}) > 1
        for r in done:
            key = f"α={r['alpha_label']} {r['rule']} lr={r['lr']:g}" + (f" seed {r['seed']}" if seeds else "")
            xs, ys = series.setdefault(key, ([], []))
            xs.append(r["rank"])
            ys.append(r["val_loss"])
        plots.lines(path, series, "rank r", "validation loss (held-out, fixed t and noise)",
                    "validation loss across the grid", logx=True, hlines={"base (no LoRA)": float(np.mean(base_val))})

    def train_curves(path):
        series = {}
        for name, losses in curves.items():
            if losses:
                ema, smooth = losses[0], []
                for x in losses:
                    ema = 0.9 * ema + 0.1 * x
                    smooth.append(ema)
                series[name] = (list(range(1, len(losses) + 1)), smooth)
        plots.lines(path, series, "step", "training loss (EMA 0.9)", "training loss", markers=False)

    def by_timestep(path):
        plots.lines(path, {k: (timesteps, v) for k, v in per_t.items()}, "timestep t", "validation loss",
                    "validation loss per timestep")

    def dw_blocks(path):
        values = np.array([[r.get(f"dW.{b}", 0.0) for b in blocks] for r in done])
        plots.matrix(path, values, [r["name"] for r in done], blocks, "||ΔW||_F per block", "||ΔW||_F")

    def scores_plot(path):
        # x: rank when the grid has several, else alpha; one line per remaining setting.
        by_rank = len({r["rank"] for r in scored}) > 1
        seeds = len({r["seed"] for r in scored}) > 1
        panels = []
        for key, label in (("concept_score", "concept score (higher: learnt)"),
                           ("forgetting_score", "forgetting score (lower: forgotten)")):
            series: dict[str, tuple[list, list]] = {}
            for r in sorted(scored, key=lambda r: r["rank"] if by_rank else r["alpha"]):
                name = (f"α={r['alpha_label']} " if by_rank else f"r={r['rank']} ") + \
                    f"{r['rule']} lr={r['lr']:g}" + (f" seed {r['seed']}" if seeds else "")
                xs, ys = series.setdefault(name, ([], []))
                xs.append(r["rank"] if by_rank else r["alpha"])
                ys.append(r[key])
            hlines = {"base": base_scores[key]} if base_scores else None
            panels.append((series, label, key.replace("_", " "), hlines))
        plots.line_panels(path, panels, "rank r" if by_rank else "alpha", logx=True)

    figures = {"sweep_train_loss.png": train_curves}
    if scored:
        figures["sweep_toy_scores.png"] = scores_plot
    if done:
        figures.update({"sweep_val_loss.png": val_vs_rank, "sweep_val_by_timestep.png": by_timestep,
                        "sweep_dw_blocks.png": dw_blocks})
    return figures

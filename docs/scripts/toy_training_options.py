# The table and validation-loss curves of docs/toy_tutorial.md §7, from the runs of toy_training_options.sh
# (run from the repository root: PYTHONPATH=. python docs/scripts/toy_training_options.py).
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from analysis.stats import mean_ci, pm

runs, variants, seeds = Path("runs/options"), ["base", "min_snr", "debiased", "huber"], [0, 1]
print(f"{'variant':10s} {'concept':>14s} {'forgetting':>14s} {'val_loss (final)':>18s}")
fig, ax = plt.subplots(figsize=(6, 3.5))
for v in variants:
    scores = [json.loads((runs / f"{v}_s{s}" / "scores.json").read_text()) for s in seeds]
    logs = [[json.loads(l) for l in (runs / f"{v}_s{s}" / "log.jsonl").read_text().splitlines()] for s in seeds]
    val = [[(r["step"], r["val_loss"]) for r in log if "val_loss" in r] for log in logs]
    row = [mean_ci([sc["trained"]["concept_score"] for sc in scores]), mean_ci([sc["trained"]["forgetting_score"] for sc in scores]),
           mean_ci([c[-1][1] for c in val])]
    print(f"{v:10s} " + " ".join(f"{pm(m, h):>16s}" for m, h, _ in row))
    steps = [s for s, _ in val[0]]
    label = {"base": "MSE (unweighted)", "min_snr": "min-SNR-γ 5", "debiased": "debiased", "huber": "Huber (snr)"}[v]
    ax.plot(steps, [sum(c[i][1] for c in val) / len(val) for i in range(len(steps))], marker="o", label=label)
ax.set_xlabel("step"); ax.set_ylabel("held-out denoising loss (mean of 2 seeds)"); ax.legend()
ax.set_title("toy, purple, 200 steps: held-out loss while training (--val_loss_every 50)", fontsize=9)
fig.tight_layout(); fig.savefig("docs/img/toy/options_val_loss.png", dpi=100)

"""The research toolkit: LoRA sweeps and the low-rank analyses of the LoRA literature, on top of sd, lora and train.

    python -m analysis <command> ...          # sweep, spectrum, subspace, amplification, intruders, extract,
                                              # resize, params, compare; `python -m analysis --help`, docs/analysis.md

    import analysis
    base = analysis.load_base("base.safetensors")
    runs = [analysis.load_run(path, base) for path in ("r8/lora_final.safetensors", "full/model_final.safetensors")]
    analysis.spectrum(runs).save("runs/analysis/spectrum")

Each analysis returns a Result (results.py): rows (CSV), a summary (its printed table), data (JSON) and plots (PNG).
deltas.py reads runs as per-layer updates ΔW, spectral.py holds the linear algebra, plots.py the figures.
"""

import devices  # noqa: F401  first: it sets OpenMP's wait policy, which only counts before torch loads

from .analyses import amplification, intruders, meta_model, params, spectrum, subspace
from .cli import main
from .compare import compare, match_budget
from .deltas import Base, Delta, Run, load_base, load_run, load_runs, read_lora_file
from .extract import extract, resize, write_lora
from .results import Result
from .sweep import SweepGrid, sweep, validation_loss

__all__ = ["Base", "Delta", "Result", "Run", "SweepGrid", "amplification", "compare", "extract", "intruders", "load_base",
           "load_run", "load_runs", "main", "match_budget", "meta_model", "params", "read_lora_file", "resize", "spectrum", "subspace",
           "sweep", "validation_loss", "write_lora"]

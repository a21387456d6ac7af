"""Research toolkit on the command line: LoRA sweeps and the low-rank analyses of the LoRA literature.

    python -m analysis sweep --rank 4,16 --alpha rank,8 --rule r,sqrt --lr 1e-4 --out runs/sweep -- --steps 500
    python -m analysis spectrum r4/lora_final.safetensors full/model_final.safetensors --base base.safetensors
    python -m analysis subspace r4/lora_final.safetensors r16/lora_final.safetensors   # φ(A1, A2, i, j)
    python -m analysis amplification r4/lora_final.safetensors --base base.safetensors
    python -m analysis intruders r4/lora_final.safetensors full/model_final.safetensors --base base.safetensors
    python -m analysis extract full/model_final.safetensors --base base.safetensors --rank 32 --out r32.safetensors
    python -m analysis resize r16/lora_final.safetensors --rank 8 --out r16_to_r8.safetensors
    python -m analysis params --model sd15 --rank 4,8,64 --targets attn-mlp

Each command prints a table and writes <name>.csv, <name>.json and PNG plots to --out (default
runs/analysis/<command>). The same analyses are Python functions in `analysis`: see docs/analysis.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .analyses import amplification, intruders, params, spectrum, subspace
from .deltas import load_runs
from .extract import DTYPES, extract, resize
from .results import Result
from .compare import compare
from .sweep import DEFAULT_TIMESTEPS, SweepGrid, sweep

DEFAULT_OUT = Path("runs/analysis")  # runs/ holds every output; not analysis/, which is this package


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _alphas(text: str) -> list[float | str]:
    out: list[float | str] = []
    for x in text.split(","):
        x = x.strip()
        if x in ("rank", "r"):
            out.append("rank")
        elif x:
            try:
                out.append(float(x))
            except ValueError:
                raise argparse.ArgumentTypeError(f"alpha: expected numbers or 'rank', got {x!r}") from None
    return out


def _dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[text]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every command: python -m analysis <command> --help. "
                                       "Guide: docs/analysis.md")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def common(q: argparse.ArgumentParser, runs: str | int | None = "+", needs_base: bool = False) -> None:
        if runs:
            q.add_argument("runs", nargs=runs, metavar="RUN",
                           help="LoRA files (.safetensors) or full fine-tuned checkpoints (these need --base)")
            q.add_argument("--labels", default="",
                           help="comma-separated names for the runs (default: file or folder names)")
            q.add_argument("--layers", default=None,
                           help="only these layers: a preset (attn, attn-mlp, all) or comma-separated globs / 're:' "
                                "regexes on layer names, e.g. '*attn2*'")
        q.add_argument("--base", required=needs_base, default=None,
                       help="the base checkpoint the runs were trained from"
                       + ("" if needs_base else " (optional for LoRAs)"))
        q.add_argument("--out", default=None,
                       help="folder for the CSV, JSON and PNG files (default runs/analysis/<command>)")
        q.add_argument("--no-plots", action="store_true", help="write only CSV and JSON")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    q = sub.add_parser("spectrum",
                       help="singular values of ΔW per layer, stable rank, rank holding 90%% of the energy")
    common(q)
    q.add_argument("--energy", type=float, default=0.9, help="energy fraction for the rank column (default 0.9)")
    q.add_argument("--keep", type=int, default=128, help="singular values per layer kept in the JSON (default 128)")

    q = sub.add_parser("subspace",
                       help="subspace similarity φ between two runs (Hu et al. 2021), with a random control")
    common(q, runs=2)
    q.add_argument("--factor", default="auto", choices=["auto", "A", "B", "dW"],
                   help="A: right singular vectors of A (the paper's choice; default for two LoRAs); B: left "
                        "singular vectors of B; dW: top right singular vectors of ΔW (default when a full "
                        "fine-tune is involved)")
    q.add_argument("--rank", type=int, default=None, help="directions per layer for dW (default: the LoRA's r, or 64)")
    q.add_argument("--common", action="store_true", help="compare the layers both runs have (default: they must match)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random control")
    q.add_argument("--max-heatmaps", type=int, default=16, help="panels in the heatmap figure (default 16)")

    q = sub.add_parser("amplification",
                       help="||ΔW|| / ||U^T W V|| for top-r directions of ΔW, of W and random (Table 7)")
    common(q, needs_base=True)
    q.add_argument("--rank", type=_ints, default=None, help="comma-separated r (default: each LoRA's r; 4,64 for full)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random directions")

    q = sub.add_parser("intruders", help="intruder dimensions of W0 + ΔW against W0, swept over ε")
    common(q, needs_base=True)
    q.add_argument("--top-k", type=int, default=10,
                   help="top singular vectors of the tuned weight examined (default 10)")
    q.add_argument("--eps", type=_floats, default=None, help="comma-separated ε (default 0.1,0.2,...,0.9)")
    q.add_argument("--side", choices=["left", "right"], default="left", help="left (output) or right (input) vectors")
    q.add_argument("--common", action="store_true", help="count only layers every run changes")

    q = sub.add_parser("extract", help="a LoRA of chosen rank from a full fine-tune or any adapter file "
                       "(DoRA, LoHa, LoKr, ...), by truncated SVD of ΔW")
    q.add_argument("tuned", help="the fine-tuned checkpoint, or an adapter file (LoRA, DoRA, LoHa, LoKr)")
    q.add_argument("--base", required=True, help="the checkpoint it was fine-tuned from")
    q.add_argument("--rank", type=int, required=True, help="LoRA rank")
    q.add_argument("--conv-rank", type=int, default=None, help="rank for 3x3 convs (default: --rank)")
    q.add_argument("--energy", type=float, default=None,
                   help="per layer, only the rank holding this fraction of ||ΔW||² (at most --rank), e.g. 0.9")
    q.add_argument("--layers", default=None, help="only these layers (preset or patterns, as for spectrum)")
    q.add_argument("--dtype", type=_dtype, default=torch.float16, help="fp16 (default), bf16 or fp32 factors")
    q.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    q.add_argument("--report", default=None, help="folder for the report (default: <out stem>_report next to it)")
    q.add_argument("--no-plots", action="store_true")
    q.add_argument("--quiet", action="store_true")

    q = sub.add_parser("resize", help="a LoRA at a lower rank, by SVD of each layer's ΔW (LoRA, LoHa, LoKr)")
    q.add_argument("lora", help="the LoRA, LoHa or LoKr file (DoRA: use extract with --base)")
    q.add_argument("--rank", type=int, required=True, help="new (maximum) rank")
    q.add_argument("--energy", type=float, default=None,
                   help="per layer, only the rank holding this fraction of ||ΔW||² (at most --rank)")
    q.add_argument("--dtype", type=_dtype, default=None, help="fp16, bf16 or fp32 (default: the input's)")
    q.add_argument("--base", default=None, help="read the file on this base checkpoint (needed for DoRA, and for "
                   "LoHa/LoKr on 3x3 convs; the new file is then kohya-named); default: none, the file alone")
    q.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    q.add_argument("--report", default=None, help="folder for the report (default: <out stem>_report next to it)")
    q.add_argument("--no-plots", action="store_true")
    q.add_argument("--quiet", action="store_true")

    q = sub.add_parser("params", help="trainable parameters and file size per block: d·k vs r·(d+k)")
    q.add_argument("--model", default="sd15", help="sd15, sd2, tiny, or a checkpoint (only its shapes are read)")
    q.add_argument("--rank", type=_ints, default=[4, 8, 16, 64], help="comma-separated ranks (default 4,8,16,64)")
    q.add_argument("--targets", default="attn", help="attn, attn-mlp, all, or comma-separated globs on module paths")
    q.add_argument("--conv-rank", type=int, default=None, help="rank for 3x3 convs (default: the rank)")
    q.add_argument("--text-encoder", action="store_true", help="also count a LoRA on the text encoder")
    q.add_argument("--bytes", type=int, default=2, choices=[2, 4], help="bytes per stored parameter (default 2: fp16)")
    q.add_argument("--out", default=None, help="folder for the CSV, JSON and PNG (default runs/analysis/params)")
    q.add_argument("--no-plots", action="store_true")
    q.add_argument("--quiet", action="store_true", help="(accepted for symmetry; params has no progress bars)")

    q = sub.add_parser("sweep", help="train a rank x alpha x rule x lr grid with train.py and compare the runs",
                       description="Options after -- go to train.py (e.g. -- --ckpt base.safetensors --images data/ "
                                   "--steps 500); the grid's values override them. On the built-in toy checkpoint "
                                   "the table also gets each run's concept and forgetting scores (train.py's "
                                   "scores.json).")
    q.add_argument("--rank", type=_ints, default=[4, 16], help="comma-separated ranks (default 4,16)")
    q.add_argument("--alpha", type=_alphas, default=["rank"], help="comma-separated alphas; 'rank' means alpha = r")
    q.add_argument("--rule", default="r", help="comma-separated scaling rules: r (alpha/r) and/or sqrt (alpha/sqrt(r))")
    q.add_argument("--lr", type=_floats, default=None,
                   help="comma-separated learning rates (default: train.py's --lr, or its recipe's)")
    q.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds (default: train.py's --seed)")
    q.add_argument("--out", default="runs/sweep", help="folder for the runs and the report (default runs/sweep)")
    q.add_argument("--val-images", default=None,
                   help="held-out images with captions (default: new toy images with the built-in toy checkpoint)")
    q.add_argument("--prompts", default="", help="'|'-separated prompts for the sample grid (default: none)")
    q.add_argument("--timesteps", type=_ints, default=list(DEFAULT_TIMESTEPS), help="timesteps of the validation loss")
    q.add_argument("--sample-steps", type=int, default=20, help="sampler steps for the sample grid")
    q.add_argument("--sample-cfg", type=float, default=5.0, help="guidance scale for the sample grid")
    q.add_argument("--no-plots", action="store_true")

    q = sub.add_parser("compare", help="adapters (and full fine-tuning) at an equal trainable-parameter budget, over "
                       "seeds: mean ± 95%% CI of the toy scores, held-out loss, ΔW rank and intruders",
                       description="Options after -- go to train.py (e.g. -- --steps 100), as for sweep. The LoRA at "
                                   "--rank sets the budget; each other adapter gets the rank (LoKr: and factor) "
                                   "closest to it. Runs train into <out>/<adapter>_s<seed>/ and are reused.")
    q.add_argument("--adapters", default="lora,dora,loha,lokr",
                   help="comma-separated adapters: lora, dora, loha, lokr (default: all four)")
    q.add_argument("--rank", type=int, default=4, help="the LoRA rank that sets the parameter budget (default 4)")
    q.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    q.add_argument("--full", action="store_true", help="also full fine-tuning (train.py --mode full; not matched)")
    q.add_argument("--full-lr", type=float, default=1e-4,
                   help="learning rate of the --full run (default 1e-4: a full fine-tune at the adapters' 1e-3 "
                        "overwrites the base, as LoRA papers' full baselines use a 10x smaller rate)")
    q.add_argument("--tolerance", type=float, default=0.1,
                   help="largest allowed difference from the LoRA budget, a fraction (default 0.1: ±10%%)")
    q.add_argument("--epsilon", type=float, default=0.5, help="intruder threshold on |cos| (default 0.5)")
    q.add_argument("--timesteps", type=_ints, default=list(DEFAULT_TIMESTEPS), help="timesteps of the validation loss")
    q.add_argument("--val-images", default=None,
                   help="held-out images with captions (default: new toy images with the built-in toy checkpoint)")
    q.add_argument("--out", default="runs/compare", help="folder for the runs and the report (default runs/compare)")
    q.add_argument("--no-plots", action="store_true")
    return p


def _report(result: Result, folder: Path, plots: bool) -> None:
    written = result.save(folder, plots=plots)
    print(result.table())
    print(f"\nwrote {', '.join(str(w) for w in written)}")


def run_command(args: argparse.Namespace, train_args: list[str]) -> Result:
    """Run one parsed command, write its files, print its table; return its Result."""
    progress = not getattr(args, "quiet", False)
    out = Path(args.out) if args.out else DEFAULT_OUT / args.command
    plots = not args.no_plots
    if args.command in ("spectrum", "subspace", "amplification", "intruders"):
        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        runs = load_runs(args.runs, args.base, labels, args.layers, progress)
        if args.command == "spectrum":
            result = spectrum(runs, args.energy, args.keep, progress)
        elif args.command == "subspace":
            result = subspace(runs[0], runs[1], args.factor, args.rank, args.common, args.seed, args.max_heatmaps,
                              progress)
        elif args.command == "amplification":
            result = amplification(runs, args.rank, args.seed, progress)
        else:
            kw = {"thresholds": args.eps} if args.eps else {}
            result = intruders(runs, args.top_k, side=args.side, common=args.common, progress=progress, **kw)
    elif args.command == "extract":
        result = extract(args.tuned, args.base, args.rank, args.out, conv_rank=args.conv_rank, energy=args.energy,
                         targets=args.layers, dtype=args.dtype, progress=progress)
    elif args.command == "resize":
        result = resize(args.lora, args.rank, args.out, energy=args.energy, dtype=args.dtype, base=args.base,
                        progress=progress)
    elif args.command == "params":
        targets = args.targets if "," not in args.targets else [t.strip() for t in args.targets.split(",")]
        result = params(args.model, args.rank, targets, args.conv_rank, args.text_encoder, args.bytes)
    elif args.command == "compare":
        adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
        result = compare(adapters, args.rank, args.seeds, train_args, args.out, full=args.full,
                         full_lr=args.full_lr, tolerance=args.tolerance, epsilon=args.epsilon,
                         timesteps=args.timesteps,
                         val_images=args.val_images)
    else:
        rules = [r.strip() for r in args.rule.split(",") if r.strip()]
        grid = SweepGrid(ranks=args.rank, alphas=args.alpha, rules=rules, lrs=args.lr, seeds=args.seeds)
        prompts = [x.strip() for x in args.prompts.split("|") if x.strip()]
        result = sweep(grid, train_args, args.out, val_images=args.val_images, prompts=prompts,
                       timesteps=args.timesteps, sample_steps=args.sample_steps, sample_cfg=args.sample_cfg)
    if args.command in ("extract", "resize"):
        out = Path(args.report) if args.report else Path(args.out).with_name(Path(args.out).stem + "_report")
    _report(result, out, plots)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    if train_args and args.command not in ("sweep", "compare"):
        parser().error("options after -- are train.py options, only for sweep and compare")
    try:
        run_command(args, train_args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

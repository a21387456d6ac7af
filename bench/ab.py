"""A/B one of our speed switches in one process: steps alternate between the switch on and off (on, off, off, on, ...).

    python bench/ab.py --flag POINTWISE_PROJ --case train --steps 20
    python bench/ab.py --flag MATMUL_CONV --case sample --res 512

The switches are the fields of fastpaths.SWITCHES, named here in capitals (MATMUL_CONV, FROZEN_CONV, WINOGRAD_CONV,
IM2COL, CPU_ATTENTION, POINTWISE_PROJ, GATED_GELU). Comparing two runs of bench.py cannot resolve a change of a few percent on a shared machine:
a run-to-run spread of ±0.03 is normal there. Alternating within one process puts both settings on the same model,
the same memory and the same slow spells of the host, and the medians of the two halves show the switch
alone. Our side only; the model, inputs and step are bench/worker.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import worker  # noqa: E402
from fastpaths import Switches, switched  # noqa: E402
from make_checkpoint import ensure_checkpoint  # noqa: E402

FLAGS = tuple(f.name.upper() for f in dataclasses.fields(Switches))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flag", choices=FLAGS, required=True, help="the fastpaths switch to alternate")
    p.add_argument("--case", choices=("train", "sample"), default="train",
                   help="train: the LoRA train step (batch 1); sample: one CFG sampling step (batch 2)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--res", type=int, default=256, help="image side in pixels (latents are res/8)")
    p.add_argument("--steps", type=int, default=12, help="timed steps, half with the switch on (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--ckpt", type=Path, default=None, help="SD1.5 checkpoint (default: bench's random one)")
    args = p.parse_args()
    if args.steps < 2:
        p.error(f"--steps must be at least 2 (one per setting), got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)

    side = argparse.Namespace(ckpt=ensure_checkpoint(args.ckpt), precision=args.precision, res=args.res,
                              batch=1 if args.case == "train" else 2, gc=False, channels_last=False, compile=False,
                              ours_load="lean", case=args.case)
    step = worker.SIDES[("ours", args.case)](side, torch.device("cpu"))[0]
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 + args.steps):
        on = i % 4 in (0, 3)  # on, off, off, on: each setting follows each equally often
        with switched(**{args.flag.lower(): on}):
            t = time.perf_counter()
            step(i)
            if i >= 2:
                times[on].append(time.perf_counter() - t)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.flag} on:  " + " ".join(f"{t:.3f}" for t in times[True]))
    print(f"{args.flag} off: " + " ".join(f"{t:.3f}" for t in times[False]))
    print(f"{args.case}-{args.precision}-{args.res}: median {on:.3f} s with {args.flag}, {off:.3f} s without: "
          f"x{on / off:.3f}")


if __name__ == "__main__":
    main()

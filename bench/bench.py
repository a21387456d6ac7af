"""Our SD1.5 LoRA step, sampling step and VAE against diffusers + peft on the same weights and inputs.

    python bench/bench.py --quick                 # 256 px cases only (a few minutes on 2 CPU cores)
    python bench/bench.py                         # every case, 256 and 512 px
    python bench/bench.py --cases train-bf16-256,sample-bf16-512 --steps 5
    python bench/bench.py --quick --threads 1 --steps 5 # on a shared machine (see bench/README.md)
    python bench/bench.py --device cuda           # on a GPU: adds fp16 train cases, 20 timed steps a side

Each side of each case runs in its own process (bench/worker.py), so peak memory (ru_maxrss; on CUDA
max_memory_allocated) is that side's alone. The driver alternates the two processes step by step (ours, ref,
ref, ours, ...) so that load from anything else on the machine falls on both alike, and reports medians.
Both sides start from the same checkpoint (bench/make_checkpoint.py writes a random SD1.5 one; --ckpt for yours),
the same LoRA init (rank 4 on to_q/to_k/to_v/to_out.0, B = 0), the same latents, contexts, noise and timesteps,
and compute the same thing: noise, timesteps, forward, fp32 MSE, backward, clipping, AdamW step.
The losses of both sides are compared as a check that they do.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import estimate  # noqa: E402
from atomic import write_text  # noqa: E402
from make_checkpoint import ensure_checkpoint  # noqa: E402
from matmul_peak import matmul_peak  # noqa: E402

# The targets: ours / reference.
TIME_TARGETS = {("train", "bf16"): 0.75, ("train", "bf16gc"): 0.75, ("train", "fp32"): 1.0, ("sample", None): 0.9}
MEMORY_TARGETS = {("train", "bf16"): 0.6, ("train", "bf16gc"): 0.6}

QUICK = ["train-fp32-256", "train-bf16-256", "train-bf16gc-256", "sample-fp32-256", "sample-bf16-256",
         "vae_enc-bf16-256", "vae_dec-bf16-256"]
FULL = ["train-fp32-256", "train-bf16-256", "train-bf16gc-256", "train-fp32-512", "train-bf16-512",
        "train-bf16gc-512", "sample-fp32-512", "sample-bf16-512", "vae_enc-fp32-512", "vae_enc-bf16-512",
        "vae_dec-fp32-512", "vae_dec-bf16-512"]


# fp16 is for GPUs without bf16 (a T4): fp16 weights, fp32 LoRA factors and a GradScaler on both sides.
PRECISIONS = ("fp32", "bf16", "bf16gc", "fp16", "fp16gc")
CUDA_EXTRA = ["train-fp16-512", "train-fp16gc-512"]


@dataclass
class Case:
    kind: str        # train, sample, vae_enc, vae_dec
    precision: str   # fp32, bf16, fp16; bf16gc / fp16gc: with gradient checkpointing
    res: int
    batch: int = 1

    @classmethod
    def parse(cls, text: str, batch: int = 1) -> Case:
        try:
            kind, precision, res = text.split("-")
            case = cls(kind, precision, int(res), batch)
        except ValueError:
            raise SystemExit(f"bad case {text!r}: expected KIND-PRECISION-RES, e.g. train-bf16-256") from None
        if kind not in ("train", "sample", "vae_enc", "vae_dec") or precision not in PRECISIONS:
            raise SystemExit(f"bad case {text!r}: kind in train/sample/vae_enc/vae_dec, "
                             f"precision in {'/'.join(PRECISIONS)}")
        if precision.endswith("gc") and kind != "train":
            raise SystemExit(f"bad case {text!r}: checkpointing applies to train only")
        if kind == "sample":
            case.batch = 2 * batch  # classifier-free guidance: the conditional and unconditional passes in one batch
        return case

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.precision}-{self.res}"

    def worker_args(self) -> list[str]:
        args = ["--case", self.kind, "--precision", self.precision.removesuffix("gc"), "--res", str(self.res),
                "--batch", str(self.batch)]
        return args + (["--gc"] if self.precision.endswith("gc") else [])

    def flops(self) -> int:
        if self.kind == "train":
            return estimate.train_flops(self.res, self.batch)
        if self.kind == "sample":
            return estimate.forward_flops(self.res, self.batch)
        return estimate.vae_flops(self.res, self.batch, encode=self.kind == "vae_enc")


@dataclass
class Side:
    name: str
    proc: subprocess.Popen
    ready: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    final: dict = field(default_factory=dict)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died (exit {self.proc.wait()}); see its stderr above")
        return json.loads(line)


def start(name: str, case: Case, args: argparse.Namespace) -> Side:
    cmd = [sys.executable, str(HERE / "worker.py"), "--side", name, *case.worker_args(), "--ckpt", str(args.ckpt),
           "--device", args.device]
    if args.compile and name in args.compile:
        cmd.append("--compile")
    if args.channels_last and name in args.channels_last:
        cmd.append("--channels-last")
    cmd += ["--ours-load", args.ours_load] if name == "ours" else ["--ref-load", args.ref_load]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    stderr = None if args.verbose else subprocess.DEVNULL
    env = dict(os.environ)
    if args.mmap_threshold:
        # glibc raises its mmap threshold each time a big block is freed (up to 32 MiB); from then on activations
        # come from the heap, and its holes count in the resident set. A fixed threshold turns that off.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    side = Side(name, proc)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{name} worker failed to start (exit {proc.wait()}); rerun with --verbose: {' '.join(cmd)}")
    side.ready = json.loads(line)
    return side


def run_case(case: Case, args: argparse.Namespace) -> dict:
    names = ["ours"] if args.no_ref else ["ours", "ref"]
    sides = []
    for n in names:  # loaded one after the other, so loading does not compete
        sides.append(start(n, case, args))
    first_steps = {}
    for i in range(args.warmup + args.steps):
        order = sides if i % 2 == 0 else sides[::-1]
        for side in order:
            r = side.ask("step")
            if i == 0:
                first_steps[side.name] = r["s"]
            if i >= args.warmup:
                side.times.append(r["s"])
                side.cpu_times.append(r["cpu_s"])
            side.losses.append(r["loss"])
    for side in sides:
        side.final = side.ask("quit")
        side.proc.wait()
    out = {"case": case.name, "kind": case.kind, "precision": case.precision, "res": case.res, "batch": case.batch}
    for side in sides:
        out[side.name] = {"median_s": statistics.median(side.times), "times": side.times,
                          "median_cpu_s": statistics.median(side.cpu_times), "cpu_times": side.cpu_times,
                          "losses": side.losses,
                          "first_step_s": first_steps[side.name], **side.ready, **side.final}
    if len(sides) == 2:
        a, b = sides[0].losses, sides[1].losses
        out["loss_rel_diff"] = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    return out


def targets(case: Case) -> tuple[float | None, float | None]:
    key = (case.kind, case.precision)
    t = TIME_TARGETS.get(key, TIME_TARGETS.get((case.kind, None)))
    return t, MEMORY_TARGETS.get(key)


def mark(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:.3f}"
    return f"{value:.3f} {'ok' if value <= target else 'MISS'} (<= {target})"


def memory_of(r: dict, device: str) -> float:
    return r["cuda_peak_gb"] if device.startswith("cuda") else r["peak_rss_gb"]


def report(results: list[dict], peaks: dict[str, float], args: argparse.Namespace) -> str:
    mem = "GPU peak GiB" if args.device.startswith("cuda") else "peak RSS GiB"
    # "paired": the median over rounds of ours/ref within a round. The two steps of a round run back to back, so a
    # slow spell of the host that spans a round cancels out of that round's ratio.
    lines = [f"| case | ours s/step | ref s/step | time ours/ref | paired ours/ref | CPU-time ours/ref | ours {mem} | "
             f"ref {mem} | memory ours/ref | MFU ours | MFU ref | loss match |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        case = Case.parse(r["case"])
        # The targets are for a CPU machine; on a GPU the ratios are shown without them.
        t_target, m_target = targets(case) if args.device == "cpu" else (None, None)
        peak = peaks["fp32" if case.precision == "fp32" else "bf16"]
        ours = r["ours"]
        mfu_ours = r["flops"] / ours["median_s"] / peak
        row = [r["case"], f"{ours['median_s']:.3f}"]
        if "ref" in r:
            ref = r["ref"]
            paired = statistics.median(a / b for a, b in zip(ours["times"], ref["times"]))
            row += [f"{ref['median_s']:.3f}", mark(ours["median_s"] / ref["median_s"], t_target), f"{paired:.3f}",
                    f"{ours['median_cpu_s'] / ref['median_cpu_s']:.3f}",
                    f"{memory_of(ours, args.device):.2f}", f"{memory_of(ref, args.device):.2f}",
                    mark(memory_of(ours, args.device) / memory_of(ref, args.device), m_target),
                    f"{mfu_ours:.0%}", f"{r['flops'] / ref['median_s'] / peak:.0%}", f"{r['loss_rel_diff']:.1e}"]
        else:
            row += ["-", "-", "-", "-", f"{memory_of(ours, args.device):.2f}", "-", "-", f"{mfu_ours:.0%}", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def memory_floor(results: list[dict]) -> str:
    """For the CPU train cases with a memory target: the least our side could peak at, whatever its allocator does.

    It is our resident set after loading (weights, Python, torch's libraries) plus the tensors autograd must keep
    for backward (bench/estimate.py; with checkpointing, counted as if every block were recomputed, which ours does
    not do below 256 latent pixels: a lower bound). When the floor is over the target, no tuning reaches it: only
    more recomputation or smaller weights would."""
    lines = []
    for r in results:
        case = Case.parse(r["case"])
        target = targets(case)[1]
        if target is None or "ref" not in r or "rss_after_load_gb" not in r["ours"]:
            continue
        # The case's own batch: Case.parse of the name alone would give 1.
        act = estimate.saved_activations(case.res, r.get("batch", 1), torch.bfloat16)
        saved = act["gc" if case.precision.endswith("gc") else "no_gc"] / estimate.GB
        loaded = r["ours"]["rss_after_load_gb"]
        ratio = (loaded + saved) / memory_of(r["ref"], "cpu")
        verdict = ("within reach" if ratio <= target else
                   "UNREACHABLE by any allocator tuning: it takes recomputation or smaller weights")
        lines.append(f"  {case.name}: {loaded:.2f} after load + {saved:.2f} saved activations = "
                     f"{loaded + saved:.2f} GiB = {ratio:.3f}x the reference; target {target}: {verdict}")
    if not lines:
        return ""
    return "Memory floor of our side (resident after load + what autograd must keep; bench/estimate.py):\n" + \
        "\n".join(lines)


def gpu_expectation(res: int, batch: int) -> str:
    """The calculated memory of an SD1.5 LoRA step on a GPU, printed whatever the device."""
    lines = [f"Expected GPU memory, SD1.5 LoRA rank 4 (attn), {res} px, batch {batch} (bench/estimate.py; GiB):",
             "| precision | checkpointing | weights | LoRA + AdamW | activations | transient | total |",
             "|---|---|---|---|---|---|---|"]
    for name, dtype in (("fp32", torch.float32), ("bf16/fp16", torch.bfloat16)):
        for gc in (False, True):
            m = estimate.expected_memory(res, batch, dtype, gc)
            lines.append(f"| {name} | {'yes' if gc else 'no'} | {m['weights']:.2f} | {m['lora+adam']:.2f} | "
                         f"{m['activations']:.2f} | {m['transient']:.2f} | {m['total']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 px cases only")
    p.add_argument("--cases", default="", help="comma-separated KIND-PRECISION-RES, e.g. train-bf16-256")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side and case (default: 3 on CPU, "
                   "20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default: 1 on CPU, "
                   "3 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1, help="images per step (sampling: prompts, each run twice for "
                   "guidance); the issue's figures are at 1, where a GPU waits on the host")
    p.add_argument("--ckpt", type=Path, default=None, help="an SD1.5 .safetensors (default: a random one, made once)")
    p.add_argument("--compile", default="", help="torch.compile these sides: ours, ref or ours,ref")
    p.add_argument("--channels-last", default="", help="channels_last memory format for these sides")
    p.add_argument("--ours-load", choices=("lean", "sd"), default="lean",
                   help="lean: UNet only, read straight into the dtype; sd: sd.load (whole model)")
    p.add_argument("--ref-load", choices=("default", "lean"), default="default",
                   help="default: diffusers built in fp32 then cast; lean: built empty and filled in the dtype")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per side (0: PyTorch's default, all cores)")
    p.add_argument("--no-ref", action="store_true", help="run our side only")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for both sides (0: glibc's dynamic default)")
    p.add_argument("--gpu-res", type=int, default=512, help="resolution of the printed GPU memory expectation")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.steps = args.steps if args.steps is not None else 20 if cuda else 3
    args.warmup = args.warmup if args.warmup is not None else 3 if cuda else 1
    names = args.cases.split(",") if args.cases else QUICK if args.quick else FULL + (CUDA_EXTRA if cuda else [])
    if not args.cases and not cuda:
        from devices import cpu_bf16_native
        native, why = cpu_bf16_native()
        if not native:  # the same rule as train.py's --precision auto: no default bf16 where it is emulated
            names = [n for n in names if "-bf16" not in n]
            print(f"note: bf16 cases left out ({why}); name them with --cases to run them anyway")
    cases = [Case.parse(c, args.batch) for c in names]
    if not cuda and any(c.precision.startswith("fp16") for c in cases):
        raise SystemExit("fp16 cases are for CUDA: CPUs have no fast fp16 matmul (use bf16)")
    if args.batch < 1:
        raise SystemExit(f"--batch must be at least 1, got {args.batch}")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")
    args.ckpt = ensure_checkpoint(args.ckpt)

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {"fp32": matmul_peak(torch.float32, args.device), "bf16": matmul_peak(torch.bfloat16, args.device)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}; load average {load:.2f}")
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    if args.device == "cpu" and load > 0.5 and torch.get_num_threads() > 1:
        print("note: other processes are using the CPU; threads that wait on each other make wall times erratic. "
              "--threads 1 and the CPU-time ratio hold up better on a shared machine.")
    results = []
    for case in cases:
        r = {"case": case.name, "flops": case.flops()}
        r.update(run_case(case, args))
        results.append(r)
        line = f"{case.name}: ours {r['ours']['median_s']:.3f} s"
        if "ref" in r:
            line += (f", ref {r['ref']['median_s']:.3f} s (x{r['ours']['median_s'] / r['ref']['median_s']:.2f}, "
                     f"CPU time x{r['ours']['median_cpu_s'] / r['ref']['median_cpu_s']:.2f}); "
                     f"memory {memory_of(r['ours'], args.device):.2f} vs {memory_of(r['ref'], args.device):.2f} GiB"
                     f"; loss diff {r['loss_rel_diff']:.1e}")
        if args.compile:
            line += "; first step (includes torch.compile) " + ", ".join(
                f"{n} {r[n]['first_step_s']:.1f} s" for n in ("ours", "ref") if n in r)
        if args.device.startswith("cuda"):
            line += f"; ours {1 / r['ours']['median_s']:.2f} it/s, {r['ours']['cuda_peak_gb']:.2f} GB"
            if case.kind == "train":
                est = estimate.expected_memory(case.res, case.batch, torch.float32 if case.precision == "fp32"
                                               else torch.bfloat16, case.precision.endswith("gc"))
                line += f" (expected {est['total']:.2f} GB)"
        print(line, flush=True)
    print()
    print(report(results, peaks, args))
    print()
    floor = memory_floor(results) if args.device == "cpu" else ""
    if floor:
        print(floor + "\n")
    print(gpu_expectation(args.gpu_res, args.batch))
    print(f"\nload average now {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        write_text(args.json, json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "device": args.device, "matmul_peak": peaks,
            "argv": sys.argv[1:], "results": results}, indent=1))


if __name__ == "__main__":
    main()

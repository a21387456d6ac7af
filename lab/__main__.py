"""python -m lab: serve the LoRA lab page for a checkpoint and its adapters on 127.0.0.1."""
from __future__ import annotations

import devices  # noqa: F401  first: it sets OpenMP's wait policy, which only counts before torch loads

import argparse
import sys
import time
from pathlib import Path

import torch

from devices import resolve_device

TOY = Path(__file__).resolve().parent.parent / "toy" / "tiny_sd.safetensors"
DEFAULT_RUN = Path("runs/toy_lora/lora_final.safetensors")
MAX_LORAS = 6
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lab",
        description="A local page that renders the same seeds with a LoRA cut to rank k, re-scaled in alpha and "
                    "scale, with blocks switched on and off, beside the singular values of its ΔW.",
        epilog="Example: python -m lab --ckpt toy/tiny_sd.safetensors --lora runs/toy_lora/lora_final.safetensors")
    p.add_argument("--ckpt", type=Path, default=None, metavar="PATH",
                   help="checkpoint, any file sd.load reads (default: the built-in toy, toy/tiny_sd.safetensors)")
    p.add_argument("--lora", action="append", type=Path, default=[], metavar="FILE",
                   help=f"adapter file, any file lora.load reads; repeat for a side-by-side grid, at most {MAX_LORAS} "
                        f"(default with the toy: {DEFAULT_RUN} if it exists)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; anything else exposes the page "
                        "and its renders to the network)")
    p.add_argument("--port", type=int, default=8024, help="port; 0 picks a free one (default: 8024)")
    p.add_argument("--device", default="auto", help="torch device, e.g. cuda:0 (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the weights (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="image side in pixels (default: the model's own: 32 for the toy, 1024 for SDXL, else 512)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1 for images of 64 px or less, such as the toy's: there one "
                        "thread is faster than several, much faster on a shared CPU; else torch's own choice)")
    p.add_argument("--verbose", action="store_true", help="log every request (default: off)")
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Path]:
    """Files and numbers, checked before any weight is read; one line naming the problem, then exit 2."""
    from sample import InputError, LoraSpec, preflight

    def fail(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message.splitlines()[0]}\n")

    loras = list(args.lora)
    if args.ckpt is None:
        args.ckpt = TOY
        if not loras:
            if DEFAULT_RUN.is_file():
                loras = [DEFAULT_RUN]
            else:
                print(f"lab: no LoRA given and {DEFAULT_RUN} does not exist: showing the base alone. "
                      "Make the default one with `python train.py` (about 5 minutes on 2 CPU cores).", file=sys.stderr)
    if len(loras) > MAX_LORAS:
        fail(f"--lora given {len(loras)} times; at most {MAX_LORAS}")
    if not 0 <= args.port <= 65535:
        fail(f"--port {args.port}: expected 0 to 65535")
    if args.size is not None and (args.size < 8 or args.size > 2048 or args.size % 8):
        fail(f"--size {args.size}: expected a multiple of 8 from 8 to 2048")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads {args.threads}: expected 1 or more")
    if not args.ckpt.is_file():
        fail(f"--ckpt {args.ckpt}: no such file")
    for path in loras:
        if not path.is_file():
            fail(f"--lora {path}: no such file")
    try:
        resolve_device(args.device)
    except ValueError as err:
        fail(f"--{err}")
    try:  # the header only: a broken checkpoint or a LoRA for another base fails here, naming the file
        preflight(args.ckpt, [LoraSpec(p, 1.0) for p in loras], args.size or 0, args.size or 0)
    except InputError as err:
        fail(str(err))
    return loras


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    loras = check_args(args, parser)

    start = time.perf_counter()
    print(f"lab: loading {args.ckpt}" + "".join(f" + {p}" for p in loras), file=sys.stderr)
    from .server import make_server
    from .state import open_lab

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    state = open_lab(args.ckpt, loras, dtype=dtype, device=device, size=args.size)
    threads = args.threads or (1 if device.type == "cpu" and max(state.width, state.height) <= 64 else None)
    if threads:
        torch.set_num_threads(threads)
    for a in state.adapters:
        print(f"lab: {a.label}: {a.kind}, {len(a.layers)} layers, rank up to {a.max_rank}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lab: warning: listening on {args.host}: anyone who can reach this port can use the page and make "
              "this machine render", file=sys.stderr)
    try:
        server = make_server(state, args.host, args.port, verbose=args.verbose)
    except OSError as err:
        parser.exit(2, f"{parser.prog}: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}\n")
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lab: ready in {time.perf_counter() - start:.1f} s: open http://{shown}:{port}/  (Ctrl-C stops)",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nlab: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

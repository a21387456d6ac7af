"""The machine's measured matmul throughput per dtype: the ceiling that model-FLOPs utilisation is quoted against.

    python bench/matmul_peak.py            # prints GFLOP/s for fp32 and bf16 on the default device
"""
from __future__ import annotations

import argparse
import time

import torch


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", sizes: tuple[int, ...] | None = None,
                repeats: int = 5) -> float:
    """Best FLOP/s of square matmuls (2·n³ FLOPs each) over a few sizes, after a warm-up call per size."""
    device = torch.device(device)
    if sizes is None:
        sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        print(f"{name}: {matmul_peak(dtype, args.device) / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

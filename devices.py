"""The torch device a --device option names, checked before any model is loaded."""
from __future__ import annotations

import os

# Sleep rather than spin while waiting for OpenMP work: on a small CPU shared with other jobs, spinning threads starve
# each other and a step can take 10x longer (measured: 0.5 s -> 11 s per toy step beside a test run; the analysis
# sweep, which imported torch before train.py could set this, trained at 0.83 s/step against train.py's 0.49 s on the
# same loaded machine, and at 0.55 s against 0.55 s once set). OpenMP reads it once, when torch loads, so this is the
# one place that sets it and every entry point (train.py, sample.py, python -m analysis / data.encode / toy.*)
# imports this module before torch. An OMP_WAIT_POLICY you set yourself wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when PyTorch sees a GPU, else cpu; anything else as torch.device reads it.

    Raises ValueError naming the problem: a name torch cannot parse, a CUDA device where this PyTorch has none
    (a CPU-only build, or no GPU visible), or a GPU index past the last one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r}: {why} (torch {torch.__version__}); use cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")
    return device


# --------------------------------------------------------------------------------------------- precision

# The CPU flags (Linux /proc/cpuinfo names) that mean bf16 matmul runs in hardware: AVX512_BF16 (Zen 4, Cooper Lake
# and later) or AMX (Sapphire Rapids and later) on x86, the BF16 extension (Armv8.6, Graviton 3, Apple M2) on Arm.
# Without them PyTorch converts bf16 to fp32 and back around every product: about 50x slower than fp32 (measured on
# a 2-core AVX2 EPYC: 0.83 against 44 GFLOP/s for a 1024x1024 matmul).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', Arm 'Features'), or None where there is no such file."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags or None


def _probe_bf16(size: int = 256, repeats: int = 3) -> float:
    """Time of a bf16 matmul over an fp32 one of the same size (a few milliseconds): about 1 or below where bf16 is
    native, 10-50 where it is emulated. For CPUs whose flags cannot be read (macOS, Windows)."""
    import time

    a = torch.randn(size, size)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        torch.mm(x, x)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(x, x)
        times[dtype] = time.perf_counter() - start
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def cpu_bf16_native() -> tuple[bool, str]:
    """(whether this CPU does bf16 matmul in hardware, the reason in a few words)."""
    flags = _cpu_flags()
    if flags is not None:
        found = [f for f in BF16_FLAGS if f in flags]
        if found:
            return True, f"this CPU has {found[0]}"
        return False, "this CPU has no avx512_bf16, amx_bf16 or bf16 flag, so PyTorch emulates bf16 (~50x slower)"
    ratio = _probe_bf16()
    if ratio < 4.0:
        return True, f"a bf16 matmul probe ran {ratio:.1f}x the fp32 time"
    return False, f"a bf16 matmul probe ran {ratio:.0f}x slower than fp32 (emulated bf16)"


def auto_precision(device: torch.device) -> tuple[str, str]:
    """('bf16' | 'fp16' | 'fp32', reason): the mixed precision that is fast on `device`.

    CUDA: bf16 where the GPU supports it, else fp16 (with a GradScaler in training). CPU: bf16 only where bf16
    matmul is native (cpu_bf16_native), else fp32; fp16 matmul is slow on every CPU."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} supports bf16"
        return "fp16", f"{torch.cuda.get_device_name(device)} has no bf16"
    if device.type != "cpu":
        return "fp32", f"{device.type} device"
    native, why = cpu_bf16_native()
    return ("bf16" if native else "fp32"), why


def precision_warning(precision: str, device: torch.device) -> str | None:
    """One line for an explicit precision that will be slow on `device`, or None."""
    if device.type != "cpu":
        return None
    if precision in ("fp16", "float16"):
        return "fp16 on a CPU is very slow (no CPU has fast fp16 matmul); fp32, or bf16 where it is native, is faster"
    if precision in ("bf16", "bfloat16"):
        native, why = cpu_bf16_native()
        if not native:
            return f"bf16 on this CPU will be slow: {why}; fp32 is faster here"
    return None

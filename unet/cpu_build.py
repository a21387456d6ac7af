"""Builds one of our C++ CPU kernels (cpu_attention.cpp, winograd.cpp) once per machine and torch version.

The build uses `torch.utils.cpp_extension` (g++ and ninja) and is cached under ~/.cache/sd-lora (SD_LORA_EXT_DIR
moves it). Where it cannot be built (no compiler, a CPU without AVX-512 BF16, not Linux) callers get None, with one
warning if the build itself failed, and keep PyTorch's kernels.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

# -fopenmp: at::parallel_for is a header template that is serial unless the extension itself is built with
# OpenMP; the library it links is the libgomp torch has already loaded.
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]


def cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to ask, so stay with PyTorch's kernels
        return False
    return "avx512_bf16" in flags.split() and "avx512bw" in flags.split()


def build_dir() -> Path:
    default = Path.home() / ".cache" / "sd-lora" / f"ext-torch{torch.__version__.replace('+', '_')}"
    return Path(os.environ.get("SD_LORA_EXT_DIR", default))


def build(name: str, source: Path, what: str) -> ModuleType | None:
    """The compiled module `name` from `source`, building it the first time; None (and a warning) if that fails.

    `what` names the kernel in messages ("CPU attention kernel").
    """
    from torch.utils import cpp_extension

    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        print(f"building the {what} once (under a minute), cached in {directory}", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                  build_directory=str(directory), verbose=False)
    except Exception as e:  # no compiler, no ninja, odd toolchain: keep PyTorch's kernel
        warnings.warn(f"{what} not built ({type(e).__name__}: {str(e)[:200]}); using PyTorch's instead",
                      stacklevel=4)
        return None

"""Builds our C++ CPU kernels (cpu_attention.cpp, winograd.cpp, im2col.cpp) once per machine and torch version.

The build uses `torch.utils.cpp_extension` (g++ and ninja) and is cached under ~/.cache/sd-lora (SD_LORA_EXT_DIR
moves it: switches.build_dir). Where it cannot be built (no compiler, a CPU without AVX-512 BF16, not Linux) callers
get None, with one warning if the build itself failed, and keep PyTorch's kernels. Each kernel module holds one
`Kernel`, which builds and loads on first use.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import ModuleType

from .switches import build_dir

# -fopenmp: at::parallel_for is a header template that is serial unless the extension itself is built with
# OpenMP; the library it links is the libgomp torch has already loaded.
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]


def cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to ask, so stay with PyTorch's kernels
        return False
    return "avx512_bf16" in flags.split() and "avx512bw" in flags.split()


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


class Kernel:
    """One of our kernels, built (or taken from the cache) the first time `get()` is called, at most once a process.

    `get()` returns the compiled module, or None where the kernel can't be had: a CPU without AVX-512 BF16 (the
    build flags above assume it) or a failed build. `state` is "untried", "ready" or "off". Whether a layer asks at
    all is the switches' business (switches.py): a kernel switched off is never built.
    """

    def __init__(self, name: str, source: Path, what: str) -> None:
        self.name, self.source, self.what = name, source, what
        self.ext: ModuleType | None = None
        self.state = "untried"

    def get(self) -> ModuleType | None:
        if self.state != "untried":
            return self.ext
        self.state = "off"
        if not cpu_has_avx512_bf16():
            return None
        self.ext = build(self.name, self.source, self.what)
        if self.ext is not None:
            self.state = "ready"
        return self.ext

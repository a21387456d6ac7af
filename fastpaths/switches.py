"""The one switch object for the fast paths, and the one place the SD_LORA_* environment variables are read.

    from fastpaths import SWITCHES, switched
    with switched(winograd_conv=False):     # the library conv for a while (A/B timing, tests)
        ...

Each field turns one fast path of layers.py on or off for the whole process; a model that fastpaths.apply has not
touched runs none of them. SD_LORA_CPU_ATTENTION=0, SD_LORA_WINOGRAD=0 and SD_LORA_IM2COL=0 start the
process with that kernel off (so it is never built); SD_LORA_EXT_DIR moves the build cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

# Switch field -> the environment variable that turns it off ("0") for a whole process.
ENVIRONMENT = {"cpu_attention": "SD_LORA_CPU_ATTENTION", "winograd_conv": "SD_LORA_WINOGRAD",
               "im2col": "SD_LORA_IM2COL"}
BUILD_DIR_VARIABLE = "SD_LORA_EXT_DIR"


@dataclasses.dataclass
class Switches:
    """Which fast paths run (True: where they apply). What each one does and what it gains: bench/README.md."""

    matmul_conv: bool = True     # few-pixel convs and every 1x1 conv as one matrix product on CPU (Conv2d)
    frozen_conv: bool = True     # a conv with a frozen weight keeps no input for backward (Conv2d)
    winograd_conv: bool = True   # float32 3x3 convs by Winograd on CPU, UNet and VAE (winograd.cpp)
    im2col: bool = True          # the C++ unfold and fold of the 3x3 convs that run as one product (im2col.cpp)
    cpu_attention: bool = True   # our attention kernel where the CPU has AVX-512 BF16 (cpu_attention.cpp)
    pointwise_proj: bool = True  # SD1's transformer projections as per-token linear maps (SpatialTransformer)
    gated_gelu: bool = True      # GEGLU's backward recomputes its gelu instead of keeping it (GEGLU)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Switches:
        """Every switch on, except the kernels the environment turns off (SD_LORA_...=0)."""
        return cls(**{field: environ.get(variable, "1") != "0" for field, variable in ENVIRONMENT.items()})


SWITCHES = Switches.from_environment()


@contextlib.contextmanager
def switched(switches: Switches | None = None, **changes: bool) -> Iterator[Switches]:
    """Set SWITCHES to `switches` (default: as they are) with `changes` for the body of a with-block, then back."""
    new = dataclasses.replace(switches or SWITCHES, **changes)  # unknown names raise TypeError here
    before = dataclasses.replace(SWITCHES)
    vars(SWITCHES).update(vars(new))
    try:
        yield SWITCHES
    finally:
        vars(SWITCHES).update(vars(before))


def build_dir() -> Path:
    """Where the C++ kernels are built and cached: SD_LORA_EXT_DIR, or one folder per torch version."""
    default = Path.home() / ".cache" / "sd-lora" / f"ext-torch{torch.__version__.replace('+', '_')}"
    return Path(os.environ.get(BUILD_DIR_VARIABLE, default))

"""The torch device a --device option names, checked before any model is loaded."""
from __future__ import annotations

import torch


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

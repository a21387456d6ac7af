"""Checkpoint I/O and the one entry point: `sd.load(path, dtype=..., device=...)` -> StableDiffusion."""
from .checkpoint import CheckpointError, CheckpointFile, write_state_dict
from .load import build_meta, build_preset, check_fits, load
from .model import StableDiffusion

__all__ = ["load", "build_meta", "build_preset", "check_fits", "StableDiffusion", "CheckpointError", "CheckpointFile",
           "write_state_dict"]

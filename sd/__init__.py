"""Checkpoint I/O and the one entry point: `sd.load(path, dtype=..., device=...)` -> StableDiffusion."""
from .checkpoint import CheckpointError, CheckpointFile, write_state_dict
from .load import build_meta, load
from .model import StableDiffusion

__all__ = ["load", "build_meta", "StableDiffusion", "CheckpointError", "CheckpointFile", "write_state_dict"]

"""Checkpoint I/O and the one entry point: `sd.load(path, dtype=..., device=...)` -> StableDiffusion."""
from .checkpoint import CheckpointError, CheckpointFile, write_state_dict
from .load import load
from .model import StableDiffusion

__all__ = ["load", "StableDiffusion", "CheckpointError", "CheckpointFile", "write_state_dict"]

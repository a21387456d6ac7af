"""Latent-diffusion UNet for Stable Diffusion 1.x/2.x (room for SDXL), laid out like the original checkpoints."""

import torch

from .config import UNetConfig
from .model import UNetModel, timestep_embedding

__all__ = ["UNetConfig", "UNetModel", "timestep_embedding", "tiny"]


def tiny(family: str = "sd1", seed: int = 0) -> UNetModel:
    """A small UNet with PyTorch's default (non-zero) random init, for tests and demos: family "sd1" or "sd2"."""
    presets = {"sd1": UNetConfig.tiny_sd1, "sd2": UNetConfig.tiny_sd2}
    if family not in presets:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(presets)}")
    # A private RNG stream, so building a test model does not disturb the caller's random state.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNetModel(presets[family]())

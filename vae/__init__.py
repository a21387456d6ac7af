"""The SD first-stage VAE (AutoencoderKL) with original checkpoint key names."""
from .config import VAEConfig
from .model import SD_SCALE, SDXL_SCALE, AutoencoderKL, DiagonalGaussian, scale_factor

__all__ = ["AutoencoderKL", "VAEConfig", "DiagonalGaussian", "scale_factor", "SD_SCALE", "SDXL_SCALE"]

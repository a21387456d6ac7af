"""Diffusion schedule: SD's DDPM betas and the conversions between eps, x0 and v."""
from .ddpm import PREDICTION_TYPES, DDPMSchedule, scaled_linear_betas, zero_terminal_snr

__all__ = ["DDPMSchedule", "PREDICTION_TYPES", "scaled_linear_betas", "zero_terminal_snr"]

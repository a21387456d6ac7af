"""The denoising loss of one sample: a distance between the UNet's output and its target, per pixel, then a weight
per timestep. Each choice is the formula of its paper, as sd-scripts and OneTrainer offer it.

    distance   l2 (the DDPM loss)   (pred - target)²
               huber                2δ·(sqrt((pred - target)² + δ²) - δ)     pseudo-Huber: ≈ d² near 0, ≈ 2δ|d| far
               smooth_l1            2·(sqrt((pred - target)² + δ²) - δ)      ≈ d²/δ near 0, ≈ 2|d| far
    δ(t)       constant c, or scheduled over the timesteps (huber_delta)
    weight(t)  min-SNR-γ and debiased estimation, from SNR(t) = ᾱ_t / (1 - ᾱ_t) (timestep_weight)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def huber_delta(t: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: str, c: float) -> torch.Tensor:
    """δ per sample for the Huber losses, scheduled over the timesteps as Khrapov et al. 2024 ("Improving Diffusion
    Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss") and sd-scripts' --huber_schedule do:

        constant     δ = c
        exponential  δ = c^(t/T)                              1 at t = 0, c at t = T
        snr          δ = (1 - c) / (1 + σ_t)² + c,  σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)     1 without noise, c as σ grows

    Small δ makes the loss L1-like (robust to outliers), so the schedules keep it L2-like where the noise is small
    and the details are learnt. float32, shaped [B]."""
    if schedule == "constant":
        return torch.full(t.shape, float(c), dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        return torch.exp(math.log(c) * t.double() / alphas_cumprod.shape[0]).float()
    if schedule == "snr":
        a = alphas_cumprod.to(t.device)[t.long()]
        sigma = ((1.0 - a) / a).sqrt()
        return ((1.0 - c) / (1.0 + sigma) ** 2 + c).float()
    raise ValueError(f"huber_schedule must be one of {HUBER_SCHEDULES}, got {schedule!r}")


def distance(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
             delta: torch.Tensor | None = None) -> torch.Tensor:
    """The per-element loss [B, C, H, W] between the UNet output and the target (both float32); delta: [B]."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    d = delta.view(-1, *([1] * (pred.ndim - 1)))
    root = torch.sqrt((pred - target) ** 2 + d**2) - d
    return 2 * d * root if loss_type == "huber" else 2 * root


def timestep_weight(snr: torch.Tensor, prediction_type: str, min_snr_gamma: float = 0.0,
                    debiased: bool = False) -> torch.Tensor | None:
    """The loss weight per sample from SNR(t), or None when no weighting is on.

    min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): min(SNR, γ) / SNR
    for eps-prediction, min(SNR, γ) / (SNR + 1) for v-prediction.
    debiased estimation (Yu et al. 2023, "Debias the Training of Diffusion Models"): 1 / sqrt(SNR) for eps, with SNR
    capped at 1000 (t = 0 is almost noise-free), as sd-scripts does; 1 / (SNR + 1) for v-prediction.
    Both on: the product, applied in that order."""
    weight = None
    eps = prediction_type == "epsilon"
    if min_snr_gamma:
        weight = snr.clamp(max=min_snr_gamma) / (snr if eps else snr + 1)
    if debiased:
        capped = snr.clamp(max=1000.0)
        w = 1.0 / capped.sqrt() if eps else 1.0 / (capped + 1)
        weight = w if weight is None else weight * w
    return weight

"""What one training step noises: the noise, its timesteps, and the noisy input, with the options that change them.

Every draw comes from the micro-batch's own generator, in a fixed order (noise, noise offset, multires noise,
timesteps, input perturbation), so a resumed run draws what an uninterrupted one would, and an option that is off
draws nothing: the run is then bitwise the run without it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def multires_noise(noise: torch.Tensor, g: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training"):
    noise + Σ_{i=0..iterations-1} discount^i · up(N(0, 1) at (H, W) / r^i), r drawn in [2, 4) per level and up()
    bilinear to (H, W) (level 0 is a second full-size draw, as in sd-scripts); stops once a level is 1 pixel; then
    divided by the batch's std, back to about unit variance.
    Low-frequency noise teaches the model to change the overall colour and layout, which plain noise barely does."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = 2 + 2 * float(torch.rand((), generator=g))
        hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn(b, c, hi, wi, generator=g)
        noise = noise + discount**i * F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)
        if hi == 1 or wi == 1:
            break
    return noise / noise.std()


def timesteps(b: int, g: torch.Generator, num_timesteps: int, low: int = 0, high: int | None = None,
              sampling: str = "uniform", mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """b training timesteps in [low, high) (high None: num_timesteps).

    uniform: each integer equally likely (the DDPM default).
    logit_normal: t = low + floor(sigmoid(u) · (high - low)), u ~ N(mean, std) (Esser et al. 2024, "Scaling
    Rectified Flow Transformers", §3.1): the middle timesteps, where the task is hardest, are drawn most."""
    high = num_timesteps if high is None else high
    if sampling == "uniform":
        return torch.randint(low, high, (b,), generator=g)
    if sampling == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(b, generator=g, dtype=torch.float64))
        return (low + (u * (high - low)).floor().long()).clamp(max=high - 1)
    raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")


def perturbed(noise: torch.Tensor, g: torch.Generator, gamma: float) -> torch.Tensor:
    """The noise that goes into the noisy input with input perturbation (Ning et al. 2023, "Input Perturbation
    Reduces Exposure Bias in Diffusion Models"): noise + γ·ξ, ξ ~ N(0, 1). The target stays the unperturbed noise,
    so the model learns to correct inputs slightly off the forward process, as its own samples are."""
    if not gamma:
        return noise
    return noise + gamma * torch.randn(noise.shape, generator=g).to(noise.device)

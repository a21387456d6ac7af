"""Which training timesteps a sampler visits and the noise levels σ there, chosen the way the diffusers schedulers choose them.

Notation: ᾱ_t is the schedule's alphas_cumprod, and σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) is the same noise level in the
"variance exploding" scale of Karras et al. (2022), where x = x0 + σ·eps. The two scales are related by
x_VE = x_VP · sqrt(1 + σ²) and ᾱ = 1 / (1 + σ²).
"""
from __future__ import annotations

import torch

SPACINGS = ("leading", "trailing", "linspace")
# SD's scheduler config adds 1 to "leading" timesteps (steps_offset=1), so that the last step sees t=1, not t=0.
SD_STEPS_OFFSET = 1


def spaced_timesteps(steps: int, spacing: str = "leading", num_train: int = 1000, offset: int = SD_STEPS_OFFSET,
                     *, clean_end: bool = False, integer: bool = True) -> torch.Tensor:
    """`steps` timesteps in descending order, float64, following Table 2 of Lin et al. (2023), "Common Diffusion
    Noise Schedules and Sample Steps are Flawed":

    - leading:  0, k, 2k, ... with k = num_train // steps, reversed, plus `offset` (SD's default).
    - trailing: num_train - 1, then down in equal strides of num_train / steps, rounded (starts at pure noise).
    - linspace: evenly from num_train - 1 down to 0.

    clean_end: lay the grid out over steps + 1 points and drop the last one (t=0), because the solver's last step
    goes to σ=0 anyway; diffusers' DPMSolverMultistepScheduler does this for "leading" and "linspace".
    integer: round linspace grids to whole timesteps (the Euler schedulers keep them fractional).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > num_train:
        raise ValueError(f"steps must be at most the {num_train} training timesteps, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    points = steps + 1 if clean_end else steps
    # The grids are computed with Python floats the way numpy computes them in diffusers (arange: start + i·step
    # with step = (start + stride) - start; linspace: i · (stop / (points - 1))), so that values landing on
    # exactly .5 round the same way (half to even, as Python's round() and numpy do).
    if spacing == "leading":
        stride = num_train // points
        t = [float(i * stride + offset) for i in reversed(range(points))]
    elif spacing == "trailing":
        step = (num_train - num_train / steps) - num_train
        # Exactly `steps` values; diffusers' float arange gives one more (t = -1) for a few counts such as 61.
        t = [float(round(num_train + i * step) - 1) for i in range(steps)]
    else:
        step = (num_train - 1) / (points - 1) if points > 1 else 0.0
        t = [i * step for i in reversed(range(points))]
        if points > 1:
            t[0] = float(num_train - 1)
        if integer:
            t = [float(round(v)) for v in t]
    return torch.tensor(t[:steps], dtype=torch.float64)


def sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t for every training timestep t = 0 .. num_train - 1 (increasing), float64."""
    a = alphas_cumprod.to(torch.float64)
    return ((1.0 - a) / a).sqrt()


def sigmas_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """σ at (possibly fractional) timesteps, interpolated linearly in σ between the whole timesteps around them."""
    table = sigma_table(alphas_cumprod)
    t = timesteps.to(torch.float64).clamp(0, table.numel() - 1)
    low = t.floor().long().clamp(max=table.numel() - 2)
    w = t - low
    return (1 - w) * table[low] + w * table[low + 1]


def sigma_to_t(sigmas: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The fractional timestep whose noise level is σ: linear interpolation in log σ (k-diffusion's convention)."""
    log_table = sigma_table(alphas_cumprod).log()
    log_s = sigmas.to(torch.float64).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table, log_s, right=True) - 1).clamp(0, log_table.numel() - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((lo - log_s) / (lo - hi)).clamp(0, 1)
    return low + w


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in σ^(1/ρ) (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho

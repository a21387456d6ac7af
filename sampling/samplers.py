"""The samplers: DDPM, DDIM, Euler, Euler ancestral and DPM-Solver++ 2M, each a plain loop over a `denoise` function.

Every sampler takes
    denoise(x_t, t, alpha_bar) -> (x0, eps)
which runs the network on latents x_t in the usual "variance preserving" scale, x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·eps,
at timestep t (a float; fractional for some grids), and returns its predictions of the clean latents and of the
noise, whatever the network's prediction type (generate.guided_denoiser builds one with classifier-free guidance).
`alpha_bar` is ᾱ at that noise level; samplers that move in σ pass 1 / (1 + σ²), which equals ᾱ_t at whole t.

Every sampler starts from x_T: unit-variance noise, the same tensor whichever sampler is used, and returns the
final latents. Ancestral samplers draw fresh noise per image from that image's own generator, so an image depends
only on its seed, not on what else is in the batch.

Each sampler reproduces the diffusers scheduler of the same name with SD's configuration (scaled-linear betas,
steps_offset=1, set_alpha_to_one=False, clip_sample=False); where we deliberately differ, the docstring says so.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .timesteps import karras_sigmas, sigma_table, sigma_to_t, sigmas_at, spaced_timesteps

Denoiser = Callable[[torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")
# The names A1111 writes into its `parameters` text, so that other tools recognise our PNGs.
A1111_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}


def check_sampler(name: str) -> str:
    """`name` if it is a sampler we have; otherwise a ValueError that lists them."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return name


def randn_per_image(shape: Sequence[int], generators: Sequence[torch.Generator] | None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 noise of `shape` on `device`. Image i is drawn from generators[i] on the CPU, so the
    numbers depend neither on the device nor on the rest of the batch (None: torch's global generator)."""
    if generators is None:
        return torch.randn(tuple(shape), dtype=torch.float32).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: got {len(generators)} for a batch of {shape[0]}")
    draws = [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(draws).to(device)


def _steps(n: int, progress: bool | str) -> tqdm:
    desc = progress if isinstance(progress, str) else None
    return tqdm(range(n), desc=desc, disable=not progress, leave=False, unit="step")


def ddpm(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *,
         spacing: str = "leading", generators: Sequence[torch.Generator] | None = None,
         progress: bool | str = False) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7) over a spaced grid,
    with the "fixed small" variance. Between two grid points t > s the one-step quantities are
    α = ᾱ_t / ᾱ_s and β = 1 - α; the last step goes to ᾱ = 1 and adds no noise."""
    a = alphas_cumprod.to(torch.float64)
    ts = spaced_timesteps(steps, spacing)
    for i in _steps(steps, progress):
        t = float(ts[i])
        ab = float(a[int(t)])
        ab_prev = float(a[int(ts[i + 1])]) if i + 1 < steps else 1.0
        x0, _ = denoise(x, t, ab)
        alpha = ab / ab_prev
        beta = 1.0 - alpha
        x = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(alpha) * (1 - ab_prev) / (1 - ab)) * x
        if i + 1 < steps:
            variance = max((1 - ab_prev) / (1 - ab) * beta, 1e-20)
            x = x + math.sqrt(variance) * randn_per_image(x.shape, generators, x.device)
    return x


def ddim(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *, eta: float = 0.0,
         spacing: str = "leading", generators: Sequence[torch.Generator] | None = None,
         progress: bool | str = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev - s²)·eps + s·z, with
    s = eta · sqrt((1-ᾱ_prev)/(1-ᾱ_t)) · sqrt(1 - ᾱ_t/ᾱ_prev). eta=0 is deterministic, eta=1 is DDPM-like.

    As in the original LDM sampler, the last step lands on ᾱ_0 (not 1). diffusers takes the previous timestep as
    t - num_train // steps; we take the next point of the grid, which is the same for "leading" and for any grid
    whose step count divides 1000."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    a = alphas_cumprod.to(torch.float64)
    ts = spaced_timesteps(steps, spacing)
    for i in _steps(steps, progress):
        t = float(ts[i])
        ab = float(a[int(t)])
        ab_prev = float(a[int(ts[i + 1])]) if i + 1 < steps else float(a[0])
        x0, eps = denoise(x, t, ab)
        std = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - std**2, 0.0)) * eps
        if eta > 0:
            x = x + std * randn_per_image(x.shape, generators, x.device)
    return x


def _euler_grid(alphas_cumprod: torch.Tensor, steps: int, spacing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) for the Euler samplers: σ interpolated at the (fractional for linspace) timesteps,
    with a final σ = 0 appended."""
    ts = spaced_timesteps(steps, spacing, integer=False)
    sigmas = torch.cat([sigmas_at(alphas_cumprod, ts), torch.zeros(1, dtype=torch.float64)])
    return ts, sigmas


def _ve_denoise(denoise: Denoiser, x: torch.Tensor, t: float, sigma: float) -> torch.Tensor:
    """x0 from latents in the VE scale (x = x0 + σ·eps): the network sees x / sqrt(1 + σ²)."""
    x0, _ = denoise(x / math.sqrt(1 + sigma**2), t, 1.0 / (1 + sigma**2))
    return x0


def euler(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *,
          spacing: str = "leading", progress: bool | str = False) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - x0(x, σ)) / σ in the VE scale (Karras et al. 2022,
    Algorithm 1 without churn).

    x_T is scaled by sqrt(1 + σ_max²), the exact VE counterpart of unit VP noise. diffusers does the same for
    "leading" and uses σ_max alone for "trailing"/"linspace" (a 0.2% difference in the starting scale)."""
    ts, sigmas = _euler_grid(alphas_cumprod, steps, spacing)
    x = x * math.sqrt(1 + float(sigmas[0]) ** 2)
    for i in _steps(steps, progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = _ve_denoise(denoise, x, float(ts[i]), sigma)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
    return x


def euler_a(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *,
            spacing: str = "leading", generators: Sequence[torch.Generator] | None = None,
            progress: bool | str = False) -> torch.Tensor:
    """Euler ancestral: each step goes deterministically down to σ_down, then adds fresh noise of size σ_up, with
    σ_up² = σ_next²(σ² - σ_next²)/σ² and σ_down² = σ_next² - σ_up², so that the marginal is at σ_next again."""
    ts, sigmas = _euler_grid(alphas_cumprod, steps, spacing)
    x = x * math.sqrt(1 + float(sigmas[0]) ** 2)
    for i in _steps(steps, progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = _ve_denoise(denoise, x, float(ts[i]), sigma)
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * randn_per_image(x.shape, generators, x.device)
    return x


def dpmpp_2m_grid(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "leading",
                  karras: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas + [0]) as diffusers' DPMSolverMultistepScheduler lays them out. With `karras`, σ runs over
    the whole training range in Karras spacing (ρ=7), and the network sees the nearest whole timestep."""
    if karras:
        table = sigma_table(alphas_cumprod)
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
        ts = sigma_to_t(sigmas, alphas_cumprod).round()
    else:
        ts = spaced_timesteps(steps, spacing, clean_end=True)
        sigmas = sigmas_at(alphas_cumprod, ts)
    return ts, torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def dpmpp_2m(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *,
             spacing: str = "leading", karras: bool = False, progress: bool | str = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep second order in λ = log(α/σ) = -log σ_VE.

    With α_t = 1/sqrt(1+σ_t²), s_t = σ_t·α_t (the VP noise scale) and h = λ_next - λ:
        x_next = (s_next / s) · x - α_next · (e^(-h) - 1) · D,
    where D = x0 on the first step and D = x0 + (x0 - x0_prev) / (2r), r = h_prev / h, afterwards (the midpoint
    form). The last step goes to σ = 0 and returns x0 itself (first order, as diffusers does)."""
    ts, sigmas = dpmpp_2m_grid(alphas_cumprod, steps, spacing, karras)
    x0_prev, lam_prev = None, 0.0
    for i in _steps(steps, progress):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0, _ = denoise(x, float(ts[i]), 1.0 / (1 + sigma**2))
        lam = -math.log(sigma)
        if sigma_next == 0:
            x = x0
        else:
            lam_next = -math.log(sigma_next)
            h = lam_next - lam
            alpha_next = 1.0 / math.sqrt(1 + sigma_next**2)
            ratio = (sigma_next * alpha_next) / (sigma / math.sqrt(1 + sigma**2))
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * (lam - lam_prev)))
            x = ratio * x - (alpha_next * math.expm1(-h)) * d
        x0_prev, lam_prev = x0, lam
    return x


def run_sampler(name: str, denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *,
                spacing: str = "leading", eta: float = 0.0, karras: bool = False,
                generators: Sequence[torch.Generator] | None = None, progress: bool | str = False) -> torch.Tensor:
    """Run sampler `name` from x_T; options a sampler does not have (eta, karras) must be left at their defaults."""
    check_sampler(name)
    if karras and name != "dpmpp_2m":
        raise ValueError(f"Karras sigmas are implemented for dpmpp_2m only, not for {name!r}")
    if eta != 0 and name != "ddim":
        raise ValueError(f"eta applies to ddim only, not to {name!r}")
    if name == "ddpm":
        return ddpm(denoise, x, alphas_cumprod, steps, spacing=spacing, generators=generators, progress=progress)
    if name == "ddim":
        return ddim(denoise, x, alphas_cumprod, steps, eta=eta, spacing=spacing, generators=generators,
                    progress=progress)
    if name == "euler":
        return euler(denoise, x, alphas_cumprod, steps, spacing=spacing, progress=progress)
    if name == "euler_a":
        return euler_a(denoise, x, alphas_cumprod, steps, spacing=spacing, generators=generators, progress=progress)
    return dpmpp_2m(denoise, x, alphas_cumprod, steps, spacing=spacing, karras=karras, progress=progress)

"""Text to image with a loaded StableDiffusion: prompt encoding, classifier-free guidance, a sampler, VAE decoding."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch import nn

from .samplers import Denoiser, check_sampler, randn_per_image, run_sampler
from .timesteps import SPACINGS


def to_x0_eps(x_t: torch.Tensor, output: torch.Tensor, alpha_bar: float,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a network output at noise level ᾱ: x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·eps, v = sqrt(ᾱ)·eps - sqrt(1-ᾱ)·x0."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return (x_t - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x_t - s * output, a * output + s * x_t
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eqs. 15-16):
    strong guidance inflates the output's scale, which zero terminal SNR makes visible as overexposure. Scale the
    guided output back to the conditional output's standard deviation (per image), and mix: φ·rescaled + (1-φ)·guided.
    The paper uses φ = 0.7."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


def guided_denoiser(unet: nn.Module, prediction_type: str, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                    cfg: float = 7.5, *, y: torch.Tensor | None = None,
                    y_uncond: torch.Tensor | None = None, cfg_rescale: float = 0.0) -> Denoiser:
    """A sampler's denoise(x_t, t, ᾱ) -> (x0, eps) for `unet` with classifier-free guidance (Ho & Salimans 2022):
    out = out(uncond) + cfg · (out(cond) - out(uncond)), on the raw output (eps or v; both convert linearly);
    cfg_rescale φ > 0 then rescales it (rescale_guidance).

    cond / uncond: text contexts [B, 77, D]. With cfg == 1 or no uncond, only the conditional pass runs.
    y / y_uncond: the extra conditioning vectors of a UNet that takes one (SDXL), for each pass.
    Both passes share one batch. Latents stay float32; the UNet casts them to its own dtype and back.
    """
    guided = uncond is not None and cfg != 1.0
    if guided and uncond.shape != cond.shape:
        raise ValueError(f"cond and uncond contexts differ in shape: {tuple(cond.shape)} vs {tuple(uncond.shape)}")
    context = torch.cat([uncond, cond]) if guided else cond
    vector = None
    if y is not None:
        if guided and (y_uncond is None or y_uncond.shape != y.shape):
            raise ValueError(f"guidance with y needs y_uncond of the same shape {tuple(y.shape)}, got "
                             f"{None if y_uncond is None else tuple(y_uncond.shape)}")
        vector = torch.cat([y_uncond, y]) if guided else y

    def denoise(x_t: torch.Tensor, t: float, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = torch.cat([x_t, x_t]) if guided else x_t
        timesteps = torch.full((x_in.shape[0],), float(t), dtype=torch.float32, device=x_t.device)
        out = (unet(x_in, timesteps, context) if vector is None else unet(x_in, timesteps, context, vector)).float()
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + cfg * (out_cond - out_uncond)
            if cfg_rescale:
                out = rescale_guidance(out, out_cond, cfg_rescale)
        return to_x0_eps(x_t, out, alpha_bar, prediction_type)

    return denoise


def size_multiple(model) -> int:
    """Image sides must be multiples of this: the VAE's downsampling (8 for SD). The UNet takes any latent size:
    its upsamplers follow the skip connections' sizes."""
    return model.vae.cfg.downsample_factor


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """A ValueError unless both sides are positive multiples of `multiple` (see size_multiple)."""
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v} (the model's VAE "
                             f"downsamples by {multiple}; try {max(multiple, round(v / multiple) * multiple)})")


def seed_list(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per image: seed, seed+1, ... (A1111's convention) or the given list."""
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    return seeds


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image. Its first draw is the image's starting noise, later draws the sampler's noise."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """eval() for the duration (no dropout, no gradient checkpointing), then each module's own mode back."""
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, training in zip(modules, was):
            m.train(training)


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def sample_latents(model, cond: torch.Tensor, uncond: torch.Tensor | None, *, sampler: str = "dpmpp_2m",
                   steps: int = 25, cfg: float = 7.5, height: int = 512, width: int = 512,
                   generators: Sequence[torch.Generator] | None = None, noise: torch.Tensor | None = None,
                   spacing: str = "leading", karras: bool = False, eta: float = 0.0,
                   progress: bool | str = False, y: torch.Tensor | None = None,
                   y_uncond: torch.Tensor | None = None, cfg_rescale: float = 0.0) -> torch.Tensor:
    """Denoised latents [B, C, H/f, W/f] (float32, scaled as the UNet sees them) from text contexts.

    A schedule with zero terminal SNR (ᾱ_T = 0) has σ_T = ∞: ddpm and ddim take it as it is, the σ-based samplers
    (euler, euler_a, dpmpp_2m) get ᾱ_T = 2⁻²⁴ (σ_T ≈ 4096), as diffusers' samplers do.

    noise: the starting x_T (unit variance); drawn from `generators` (one per image) when not given.
    y / y_uncond: SDXL's conditioning vectors for the two passes (see StableDiffusion.vector).
    """
    if getattr(model, "needs_y", False) and y is None:
        raise ValueError(f"this {model.version} UNet takes a conditioning vector y: "
                         "pass y (and y_uncond with cfg != 1)")
    check_sampler(sampler)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    multiple = size_multiple(model)
    check_size(height, width, multiple)
    f = model.vae.cfg.downsample_factor
    shape = (cond.shape[0], model.unet.cfg.in_channels, height // f, width // f)
    if noise is None:
        noise = randn_per_image(shape, generators)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape} for {height}x{width} images")
    x = noise.to(device=model.device, dtype=torch.float32)
    denoise = guided_denoiser(model.unet, model.prediction_type, cond, uncond, cfg, y=y, y_uncond=y_uncond,
                              cfg_rescale=cfg_rescale)
    alphas_cumprod = model.schedule.alphas_cumprod
    if alphas_cumprod[-1] == 0 and sampler not in ("ddpm", "ddim"):
        alphas_cumprod = alphas_cumprod.clone()
        alphas_cumprod[-1] = 2.0**-24
    with torch.inference_mode(), eval_mode(model.unet):
        return run_sampler(sampler, denoise, x, alphas_cumprod, steps, spacing=spacing, eta=eta,
                           karras=karras, generators=generators, progress=progress)


def decode(model, latents: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
    """Latents -> images in [0, 1], float32 [B, 3, H, W] on the CPU. slice_size: images per VAE pass."""
    vae_dtype = next(model.vae.parameters()).dtype
    with torch.inference_mode(), eval_mode(model.vae):
        images = model.decode_latents(latents.to(vae_dtype), slice_size=slice_size)
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def generate(model, prompts: str | Sequence[str], negative: str | Sequence[str] = "", *, sampler: str = "dpmpp_2m",
             steps: int = 25, cfg: float = 7.5, seed: int | Sequence[int] = 0, height: int = 512, width: int = 512,
             karras: bool = False, eta: float = 0.0, spacing: str = "leading", noise: torch.Tensor | None = None,
             slice_size: int | None = None, progress: bool | str = True, cfg_rescale: float = 0.0) -> torch.Tensor:
    """Text to image: float32 images in [0, 1], shaped [B, 3, height, width], on the CPU (`to_pil` makes PIL images).

    model: a StableDiffusion from sd.load (with or without LoRA layers; its modes are restored afterwards).
    prompts: one prompt, or one per image. negative: the negative prompt ("" is SD's unconditional prompt),
        one for all or one per image.
    sampler: one of SAMPLERS ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m"); steps: denoising steps.
    cfg: classifier-free guidance scale (1 = conditional only, no negative pass); cfg_rescale: φ of CFG rescale
        (rescale_guidance; 0: off, 0.7 with zero terminal SNR).
    seed: image i uses seed + i (or pass one seed per image); the same seed gives the same image whatever the
        batch. noise: the starting latents instead (unit variance, [B, 4, height/8, width/8] for SD).
    height, width: in pixels, multiples of 8 for SD (size_multiple(model)).
    karras: Karras sigmas (dpmpp_2m only); eta: DDIM's noise (ddim only); spacing: "leading" (SD's default),
        "trailing" or "linspace".
    slice_size: images per VAE decode pass; None decodes one at a time above 512x512 pixels, else all at once.
    progress: show a progress bar (a string is used as its label).

    Networks run in the model's dtype and device; sampler arithmetic is float32.

    SDXL: y is the pooled text plus the size conditioning original = target = (height, width), crop (0, 0). An
    empty negative prompt gives zero context and pooled vectors for that image, as SDXL's authors sample (sgm zeroes
    the unconditional text; diffusers' force_zeros_for_empty_prompt); a non-empty one is encoded.
    """
    prompts = _as_list(prompts)
    negatives = _as_list(negative)
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
    generators = make_generators(seed_list(seed, len(prompts)))
    y = y_uncond = None
    with torch.inference_mode(), eval_mode(model.text_encoder):
        if getattr(model, "needs_y", False):
            cond, y, uncond, y_uncond = _sdxl_conditioning(model, prompts, negatives if cfg != 1.0 else None,
                                                           height, width)
        else:
            cond = model.encode_prompt(prompts)
            uncond = model.encode_prompt(negatives) if cfg != 1.0 else None
    latents = sample_latents(model, cond, uncond, sampler=sampler, steps=steps, cfg=cfg, height=height, width=width,
                             generators=generators, noise=noise, spacing=spacing, karras=karras, eta=eta,
                             progress=progress, y=y, y_uncond=y_uncond, cfg_rescale=cfg_rescale)
    if slice_size is None and height * width > 512 * 512:
        slice_size = 1
    return decode(model, latents, slice_size)


def _sdxl_conditioning(model, prompts: list[str], negatives: list[str] | None, height: int, width: int):
    """(cond, y, uncond, y_uncond) for SDXL; an empty negative prompt is zeros (see generate)."""
    cond, pooled = model.encode_text(prompts)
    y = model.vector(pooled, (height, width))
    if negatives is None:
        return cond, y, None, None
    uncond, pooled_uncond = model.encode_text(negatives)
    empty = torch.tensor([n == "" for n in negatives], device=uncond.device)
    uncond = torch.where(empty[:, None, None], torch.zeros_like(uncond), uncond)
    pooled_uncond = torch.where(empty[:, None], torch.zeros_like(pooled_uncond), pooled_uncond)
    return cond, y, uncond, model.vector(pooled_uncond, (height, width))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8 (rounded)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] floats in [0, 1] -> RGB PIL images."""
    return [Image.fromarray(a.numpy()) for a in to_uint8(images.detach().cpu())]

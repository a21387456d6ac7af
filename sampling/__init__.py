"""Text-to-image sampling: samplers written here (DDPM, DDIM, Euler, Euler a, DPM++ 2M), guidance, and PNG output."""
from .generate import (check_size, decode, eval_mode, generate, guided_denoiser, make_generators, sample_latents,
                       seed_list, size_multiple, to_pil, to_uint8, to_x0_eps)
from .images import a1111_parameters, grid, next_index, parse_a1111_parameters, save_png
from .samplers import (A1111_NAMES, SAMPLERS, check_sampler, ddim, ddpm, dpmpp_2m, euler, euler_a, randn_per_image,
                       run_sampler)
from .timesteps import SPACINGS, karras_sigmas, sigma_to_t, sigmas_at, spaced_timesteps

__all__ = [
    "A1111_NAMES", "SAMPLERS", "SPACINGS", "a1111_parameters", "check_sampler", "check_size", "ddim", "ddpm", "decode",
    "dpmpp_2m", "euler", "euler_a", "eval_mode", "generate", "grid", "guided_denoiser", "karras_sigmas",
    "make_generators", "next_index", "parse_a1111_parameters", "randn_per_image", "run_sampler", "sample_latents",
    "save_png", "seed_list", "sigma_to_t", "sigmas_at", "size_multiple", "spaced_timesteps", "to_pil", "to_uint8",
    "to_x0_eps",
]

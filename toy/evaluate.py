"""Sample a toy model and score the images with the world's detectors: how well it draws the base world, and
whether it draws a held-out concept.

    python -m toy.evaluate --model toy/tiny_sd.safetensors --grid toy_samples.png

Sampling is a plain DDIM loop (eta = 0) with classifier-free guidance, kept here so the toy needs nothing else.
"""
from __future__ import annotations

import devices  # noqa: F401  first: it sets OpenMP's wait policy, which only counts before torch loads

import argparse
import os
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import detect, world


def noise_for(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Starting noise; image i depends only on (seed, i), not on the batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + i))
                        for i in range(n)])


@torch.no_grad()
def ddim_sample(model, prompts: Sequence[str], steps: int = 25, guidance: float = 5.0, seed: int = 0,
                negative: str = "", batch_size: int = 64, progress: str | bool = False) -> torch.Tensor:
    """Images in [-1, 1], [N, 3, H, W], for `prompts`, from a loaded StableDiffusion (sd.load).
    progress: a label (or True) for a progress bar over every UNet call, with its ETA."""
    prompts = list(prompts)
    if not prompts or steps < 1:
        raise ValueError(f"need at least one prompt and one step, got {len(prompts)} prompts, steps={steps}")
    factor = model.vae.cfg.downsample_factor
    latent_shape = (model.unet.cfg.in_channels, world.IMAGE_SIZE // factor, world.IMAGE_SIZE // factor)
    schedule = model.schedule
    a_bar = schedule.alphas_cumprod.float()
    ts = torch.linspace(schedule.num_timesteps - 1, 0, steps).round().long()
    uncond = model.encode_prompt([negative])
    noise = noise_for(len(prompts), latent_shape, seed)
    out = []
    chunks = -(-len(prompts) // batch_size)
    bar = tqdm(total=chunks * steps, desc=progress if isinstance(progress, str) else "sampling", unit="step",
               disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = model.encode_prompt(chunk)
        context = torch.cat([uncond.expand(len(chunk), -1, -1), cond])
        x = noise[start:start + len(chunk)].to(model.device, model.dtype)
        for i, t in enumerate(ts):
            eps_u, eps_c = model.unet(torch.cat([x, x]), t.expand(2 * len(chunk)), context).float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            tt = t.expand(len(chunk))
            if schedule.prediction_type != "epsilon":  # the guided output is a v; turn it into x0 and eps
                x0, eps = schedule.predict_x0_and_eps(x.float(), eps, tt)
            else:
                x0 = schedule.x0_from_eps(x.float(), eps, tt)
            a_prev = a_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(model.dtype)
            bar.update()
        out.append(model.decode_latents(x).float().clamp(-1, 1))
    bar.close()
    return torch.cat(out)


def save_grid(images, path: str | os.PathLike, ncol: int = 8, scale: int = 4) -> Path:
    """A PNG grid of images (any layout detect.as_uint8_images takes), each upscaled `scale` times."""
    from PIL import Image

    arr = detect.as_uint8_images(images)
    n, h, w, _ = arr.shape
    rows = -(-n // ncol)
    grid = np.full((rows * (h + 1) + 1, ncol * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i, im in enumerate(arr):
        r, c = divmod(i, ncol)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = im
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)
    return path


def evaluate(model, concept: str = world.DEFAULT_CONCEPT, n_base: int = 48, n_concept: int = 16, n_world: int = 48,
             steps: int = 25, guidance: float = 5.0, seed: int = 0, progress: str | bool = False,
             concept_word: str | None = None) -> dict:
    """Scores of one model: `forgetting_score` and per-attribute accuracy on the base prompts (world.base_prompts),
    `concept_score` on the concept prompts, and per-attribute accuracy on random training-like scenes
    (`world`, counts and small objects included). Images come back under "images" for grids.
    concept_word: the word the concept prompts use for the concept (a new token, a rare word); default its name."""
    base = world.base_prompts(n_base)
    conc = world.concept_prompts(concept, n_concept)
    rand = world.make_scenes(n_world, seed=99)
    scenes = base + conc + rand
    captions = [s.caption for s in base]
    captions += [world.caption_with_word(s, concept, concept_word) for s in conc]
    captions += [s.caption for s in rand]
    images = ddim_sample(model, captions, steps=steps, guidance=guidance, seed=seed, progress=progress)
    ib, ic, iw = images[:n_base], images[n_base:n_base + n_concept], images[n_base + n_concept:]
    return {
        "forgetting_score": detect.forgetting_score(ib, base),
        "base_accuracy": detect.accuracy(ib, base),
        "concept_score": detect.concept_score(ic, concept),
        "world_accuracy": detect.accuracy(iw, rand),
        "images": {"base": ib, "concept": ic, "world": iw},
        "prompts": {"base": captions[:n_base], "concept": captions[n_base:n_base + n_concept],
                    "world": [s.caption for s in rand]},
    }


def main(argv: list[str] | None = None) -> dict:
    import sd

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy/tiny_sd.safetensors")
    parser.add_argument("--concept", default=world.DEFAULT_CONCEPT, choices=world.CONCEPTS)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="write a PNG grid: base prompts, concept prompts, random scenes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = sd.load(args.model)
    t = time.perf_counter()
    result = evaluate(model, args.concept, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      progress="sampling for the scores")
    summary = {k: v for k, v in result.items() if k not in ("images", "prompts")}
    print(json.dumps(summary, indent=2))
    print(f"chance: colour 1/4 (base colours), shape 1/3; sampled in {time.perf_counter() - t:.1f} s")
    if args.grid:
        imgs = result["images"]
        path = save_grid(torch.cat([imgs["base"], imgs["concept"], imgs["world"]]), args.grid)
        print(f"grid: {path} (rows 1-6 base prompts, 7-8 '{args.concept}' prompts, 9-14 random world scenes)")
    return result


if __name__ == "__main__":
    main()

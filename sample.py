"""sample.py: text to image from a Stable Diffusion 1.x/2.x checkpoint with optional LoRAs; PNGs carry A1111 parameters.

    python sample.py --ckpt model.safetensors --prompt "a photo of a cat" --lora style.safetensors:0.8 \
        --sampler dpmpp_2m --karras --steps 25 --cfg 7.5 --seed 0 --size 512x512 --batch 4 --out outputs --grid
    python sample.py --ckpt model.safetensors --prompt "..." --lora style.safetensors --lora-scales 0,0.5,1
    python sample.py --ckpt model.safetensors --prompt "a photo of <my-dog>" --embedding runs/ti/embedding_final.safetensors

Every input that can be checked without the weights (sizes, files, sampler name, whether each LoRA fits the
checkpoint's architecture) is checked before a single weight is read.
"""
from __future__ import annotations

import devices  # noqa: F401  first: it sets OpenMP's wait policy, which only counts before torch loads

import argparse
import math
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from devices import precision_warning, resolve_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class InputError(ValueError):
    """Bad input found before sampling; main() prints it as `sample.py: error: ...` and exits with status 2."""


@dataclass
class LoraSpec:
    path: Path
    scale: float
    name: str = ""


# ------------------------------------------------------------------------------------------------ parsing

def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (width 512, height 768); '512' -> (512, 512). Both must be positive multiples of 8."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        width, height = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        raise InputError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 512x512 or 768x512") from None
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % 8:
            raise InputError(f"--size {text}: {name} {v} is not a positive multiple of 8 "
                             f"(the VAE works on 8x8 pixel blocks); try {max(8, round(v / 8) * 8)}")
    return width, height


def parse_lora(text: str) -> LoraSpec:
    """'FILE' or 'FILE:SCALE'. A name that is itself an existing file is taken whole (a ':' may be part of it);
    otherwise what follows the last ':' must be a number."""
    path, sep, scale = text.rpartition(":")
    if not sep or not path or Path(text).is_file() or "/" in scale or "\\" in scale:
        return LoraSpec(Path(text), 1.0)
    try:
        value = float(scale)
    except ValueError:
        raise InputError(f"--lora {text}: the scale {scale!r} after the last ':' is not a number "
                         f"(expected FILE or FILE:SCALE, e.g. {path}:0.8)") from None
    if not math.isfinite(value):
        raise InputError(f"--lora {text}: the scale must be a finite number, got {scale!r}")
    return LoraSpec(Path(path), value)


@dataclass
class EmbeddingSpec:
    path: Path
    token: str | None  # None: the name in the file, else its stem


def parse_embedding(text: str) -> EmbeddingSpec:
    """'FILE' or 'FILE:TOKEN'. A name that is itself an existing file is taken whole."""
    path, sep, token = text.rpartition(":")
    if not sep or not path or Path(text).is_file() or "/" in token or "\\" in token:
        return EmbeddingSpec(Path(text), None)
    return EmbeddingSpec(Path(path), token)


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--lora-scales {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not scales:
        raise InputError("--lora-scales: give at least one number, e.g. 0,0.5,1")
    return scales


def build_parser() -> argparse.ArgumentParser:
    from sampling import SAMPLERS, SPACINGS

    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Text to image with a Stable Diffusion 1.x/2.x checkpoint, optional LoRAs and samplers written "
                    "in this project. Writes PNGs carrying their generation parameters (A1111 `parameters` text).",
        epilog="Example: python sample.py --ckpt v1-5.safetensors --prompt 'a cat' --lora style.safetensors:0.8 "
               "--lora-scales 0,0.5,1 --batch 2 --out outputs")
    p.add_argument("--ckpt", required=True, type=Path, metavar="PATH",
                   help="checkpoint file, .safetensors or .ckpt in the original SD layout (required)")
    p.add_argument("--prompt", required=True, help="what to draw (required)")
    p.add_argument("--negative", default="", metavar="TEXT",
                   help="negative prompt (default: empty, SD's unconditional prompt)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA file and its multiplier (default SCALE: 1); repeat for several LoRAs (default: none)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding (.safetensors, or .pt read without running code; A1111, ComfyUI, "
                        "diffusers and our layouts) under TOKEN (default: the name stored in the file, else the file "
                        "name without extension); the token in --prompt or --negative then uses its vectors; repeat "
                        "for several (default: none)")
    p.add_argument("--lora-scales", default=None, metavar="S1,S2,...",
                   help="render the same seeds at each of these LoRA multipliers (each times the file's SCALE) and "
                        "write them side by side in one grid, e.g. 0,0.5,1 (default: off)")
    p.add_argument("--merge", action="store_true",
                   help="add each LoRA into the weights once, at its SCALE, before sampling: steps run at the base "
                        "model's speed and the image is the one the live LoRAs give; not with --lora-scales "
                        "(default: off, the LoRAs run live beside the frozen weights)")
    p.add_argument("--sampler", default="dpmpp_2m", metavar="NAME",
                   help=f"one of {', '.join(SAMPLERS)} (default: dpmpp_2m)")
    p.add_argument("--karras", action="store_true", help="Karras noise levels, dpmpp_2m only (default: off)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise, ddim only: 0 deterministic, 1 DDPM-like (default: 0)")
    p.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="timestep spacing: leading (SD's), trailing (starts at pure noise) or linspace "
                        "(default: leading; trailing with --zero-terminal-snr)")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="sample with the rescaled schedule whose last timestep is pure noise (Lin et al. 2024), for "
                        "v-prediction models and LoRAs trained with train.py --zero_terminal_snr; on by itself (with "
                        "a note) when a --lora file says ss_zero_terminal_snr (default: off)")
    p.add_argument("--cfg-rescale", type=float, default=0.0, metavar="PHI",
                   help="CFG rescale φ in [0, 1]: pull the guided output back to the conditional one's scale (Lin et "
                        "al. 2024; 0.7 with zero terminal SNR) (default: 0, off)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps, 1-1000 (default: 25)")
    p.add_argument("--cfg", type=float, default=7.5,
                   help="classifier-free guidance scale; 1 means no guidance (default: 7.5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the first image; image i uses seed+i; -1 picks one at random (default: 0)")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="image width x height in pixels, multiples of 8 (default: the model's own size: 1024x1024 "
                        "for SDXL, 32x32 for the built-in toy, else 512x512)")
    p.add_argument("--batch", type=int, default=1,
                   help="number of images, with seeds seed .. seed+batch-1, run as one batch (default: 1)")
    p.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR",
                   help="output folder, created if missing; files are never overwritten (default: outputs)")
    p.add_argument("--grid", action="store_true", help="also write a grid of the batch (default: off)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the weights and activations (default: fp16 on CUDA, fp32 on CPU; bf16 is fast only on "
                        "CPUs with native bf16 (AVX512_BF16, AMX, Arm BF16), elsewhere it is emulated and much slower)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="override the detected prediction type; SD2 768-v and 512 files have the same shapes "
                        "(default: detected)")
    p.add_argument("--vae-slice", type=int, default=None, metavar="N",
                   help="images per VAE decode pass, to bound memory (default: 1 above 512x512 pixels, else all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages (default: off)")
    return p


def check_args(args: argparse.Namespace) -> tuple[int, int, list[LoraSpec], list[float] | None]:
    """Everything that needs no file contents: raises InputError with a readable message."""
    from sampling import SAMPLERS

    if args.sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {args.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    width, height = parse_size(args.size) if args.size else (0, 0)  # 0: the model's own, once its version is known
    if args.steps < 1 or args.steps > 1000:
        raise InputError(f"--steps must be between 1 and 1000, got {args.steps}")
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    if args.cfg < 0 or not math.isfinite(args.cfg):
        raise InputError(f"--cfg must be a finite number >= 0, got {args.cfg}")
    if not 0 <= args.cfg_rescale <= 1:
        raise InputError(f"--cfg-rescale must be in [0, 1], got {args.cfg_rescale}")
    if args.karras and args.sampler != "dpmpp_2m":
        raise InputError(f"--karras applies to dpmpp_2m only, not to {args.sampler}")
    if args.eta and args.sampler != "ddim":
        raise InputError(f"--eta applies to ddim only, not to {args.sampler}")
    if args.eta < 0:
        raise InputError(f"--eta must be >= 0, got {args.eta}")
    if args.seed < -1:
        raise InputError(f"--seed must be >= 0 (or -1 for a random seed), got {args.seed}")
    if args.vae_slice is not None and args.vae_slice < 1:
        raise InputError(f"--vae-slice must be >= 1, got {args.vae_slice}")
    if not args.ckpt.is_file():
        raise InputError(f"--ckpt {args.ckpt}: no such file")
    loras = [parse_lora(text) for text in args.lora]
    for spec in loras:
        if not spec.path.is_file():
            raise InputError(f"--lora {spec.path}: no such file")
    _name_loras(loras)
    for text in args.embedding:
        spec = parse_embedding(text)
        if not spec.path.is_file():
            raise InputError(f"--embedding {spec.path}: no such file")
    scales = parse_scales(args.lora_scales) if args.lora_scales is not None else None
    if scales is not None and not loras:
        raise InputError("--lora-scales needs at least one --lora FILE")
    if scales is not None and args.merge:
        raise InputError("--merge fixes each LoRA's multiplier in the weights, --lora-scales varies it: give only one")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a folder")
    if args.device is not None:
        try:
            resolve_device(args.device)
        except ValueError as err:
            raise InputError(f"--{err}") from None
    return width, height, loras, scales


def _name_loras(loras: list[LoraSpec]) -> None:
    """Adapter names: the file stems, made unique (they label the layers and the <lora:name:scale> tags)."""
    seen: dict[str, int] = {}
    for spec in loras:
        stem = spec.path.stem
        seen[stem] = seen.get(stem, 0) + 1
        spec.name = stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"


# ------------------------------------------------------------------------------------------ preflight

def default_size(version: str, ckpt: Path) -> int:
    """The side the model was trained at: what --size defaults to."""
    from toy.hooks import is_builtin_toy
    if is_builtin_toy(ckpt):
        return 32
    return 1024 if version == "sdxl" else 512


def preflight(ckpt: Path, loras: list[LoraSpec], width: int, height: int, merge: bool = False,
              zero_terminal_snr: bool = False, prediction_type: str | None = None,
              embeddings: list[EmbeddingSpec] = ()) -> tuple[int, int]:
    """Read only the checkpoint's header, build its UNet and text encoder on the meta device, and check the image
    size against the model and each LoRA against the model (a LoRA for another base fails here), all before any
    weight is read; `merge`: as --merge will load them; `zero_terminal_snr`: the model must predict v. Returns the
    image size (width, height), with the model's own for 0."""
    import lora
    import sd
    from sd.load import build_meta, detect_prediction_type  # sd.load's own inference, on the header only
    from sd.model import UNET_PREFIX, VAE_PREFIX, text_prefix

    try:
        header, version, models = build_meta(ckpt)
    except sd.CheckpointError as err:
        raise InputError(str(err)) from None
    if zero_terminal_snr and (prediction_type or detect_prediction_type(header, version)) == "epsilon":
        raise InputError(f"--zero-terminal-snr: {ckpt.name} predicts eps, which is undefined at the pure-noise "
                         f"timestep; it is for v-prediction models (--prediction-type v_prediction to override)")
    unet, vae, text = models[UNET_PREFIX], models[VAE_PREFIX], models[text_prefix(version)]
    if not width:
        width = height = default_size(version, ckpt)
    multiple = vae.cfg.downsample_factor
    for name, v in (("width", width), ("height", height)):
        if v % multiple:
            raise InputError(f"--size {width}x{height}: {name} {v} is not a multiple of {multiple}; this model's VAE "
                             f"downsamples by {multiple} (try {max(multiple, round(v / multiple) * multiple)})")
    from lora.io import read_tensors
    from text import CLIPTokenizer, embedding_file

    tokenizer = CLIPTokenizer()
    for spec in embeddings:  # width, layout and token checked on the meta-built text encoder: nothing is loaded
        try:
            embedding_file.load(spec.path, text, tokenizer, spec.token)
        except ValueError as err:
            raise InputError(f"--embedding {err}") from None
    for spec in loras:
        try:
            read_tensors(spec.path)  # an empty, truncated or pickled file: one line that names it
        except (ValueError, OSError) as err:
            raise InputError(f"--lora {err}") from None
        try:
            info = lora.load(spec.path, {"unet": unet, "text_encoder": text}, scale=spec.scale, name=spec.name,
                             merge=merge)
        except (ValueError, TypeError, OSError) as err:
            raise InputError(f"--lora {spec.path} does not fit {ckpt.name} ({version}): {err}") from None
        # Shapes fit; a file that names another base still deserves a word (an attn1-only LoRA fits SD1 and SD2).
        said = info.metadata.get("ss_base_model_version", "")
        family = ("sd1" if said.startswith("sd_v1") else "sd2" if said.startswith("sd_v2")
                  else "sdxl" if said.startswith("sdxl") else None)
        if family and family != version:
            print(f"warning: --lora {spec.path} says it was trained on {said}, but {ckpt.name} is {version}",
                  file=sys.stderr)
    return width, height


# ------------------------------------------------------------------------------------------------- main

def _set_lora_multipliers(model, loras: list[LoraSpec], factor: float) -> None:
    import lora

    for spec in loras:
        for part in (model.unet, model.text_encoder):
            if lora.lora_layers(part, spec.name):
                lora.set_multiplier(part, spec.scale * factor, spec.name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        width, height, loras, scales = check_args(args)
        embeddings = [parse_embedding(text) for text in args.embedding]
        width, height = preflight(args.ckpt, loras, width, height, merge=args.merge,
                                  zero_terminal_snr=args.zero_terminal_snr, prediction_type=args.prediction_type,
                                  embeddings=embeddings)
    except InputError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")

    import lora
    import sd
    from sampling import a1111_parameters, generate, grid, next_index, save_png, to_pil
    from schedule import DDPMSchedule, zero_terminal_snr

    device = resolve_device(args.device or "auto")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    warning = precision_warning(args.dtype or "", device)
    if warning and not args.quiet:
        print(f"warning: {warning}", file=sys.stderr)
    seed = args.seed if args.seed >= 0 else secrets.randbelow(2**32)
    seeds = [seed + i for i in range(args.batch)]
    progress = not args.quiet

    if progress:
        print(f"loading {args.ckpt} ({dtype}, {device})", file=sys.stderr)
    model = sd.load(args.ckpt, dtype=dtype, device=device, prediction_type=args.prediction_type)
    from text import embedding_file

    for spec in embeddings:
        token = embedding_file.load(spec.path, model.text_encoder, model.tokenizer, spec.token)
        if progress:
            used = token.lower() in f"{args.prompt} {args.negative}".lower()
            print(f"embedding {spec.path.name}: token {token!r}, {len(model.tokenizer.added_tokens[token])} vector(s)"
                  + ("" if used else "; not in the prompt, so unused"), file=sys.stderr)
    for spec in loras:
        try:
            info = lora.load(spec.path, model, scale=spec.scale, name=spec.name, merge=args.merge)
        except ValueError as err:
            parser.exit(2, f"{parser.prog}: error: --lora {spec.path}: {err}\n")
        if progress:
            print(f"LoRA {spec.name}: {len(info.modules)} layers, multiplier {spec.scale:g}"
                  + (", merged into the weights" if args.merge else ""), file=sys.stderr)
        if info.metadata.get("ss_zero_terminal_snr") == "True" and not args.zero_terminal_snr:
            if model.prediction_type == "v_prediction":
                args.zero_terminal_snr = True
                print(f"note: {spec.path} was trained with zero terminal SNR: sampling with that schedule "
                      f"(--zero-terminal-snr)", file=sys.stderr)
            else:
                print(f"warning: {spec.path} was trained with zero terminal SNR, but this model predicts eps: "
                      f"sampling with SD's schedule", file=sys.stderr)
    if args.zero_terminal_snr:
        model.schedule = DDPMSchedule(zero_terminal_snr(model.schedule.betas), model.prediction_type)
    if args.spacing is None:
        args.spacing = "trailing" if args.zero_terminal_snr else "leading"

    args.out.mkdir(parents=True, exist_ok=True)
    index = next_index(args.out)
    first_index = index
    written: list[Path] = []
    columns: list[list] = []  # one list of PIL images per LoRA scale (or a single one)

    def parameters(seed_: int, factor: float | None, extra: dict | None = None) -> str:
        active = [(spec.name, spec.scale * (1.0 if factor is None else factor)) for spec in loras]
        extra = {**({"Schedule": "zero terminal SNR"} if args.zero_terminal_snr else {}),
                 **({"CFG rescale": f"{args.cfg_rescale:g}"} if args.cfg_rescale else {}), **(extra or {})} or None
        return a1111_parameters(args.prompt, args.negative, steps=args.steps, sampler=args.sampler, cfg=args.cfg,
                                seed=seed_, width=width, height=height, model=args.ckpt.stem, karras=args.karras,
                                eta=args.eta, spacing=args.spacing, loras=active, extra=extra)

    for factor in scales if scales is not None else [None]:
        if factor is not None:
            _set_lora_multipliers(model, loras, factor)
        label = f"LoRA x{factor:g}" if factor is not None else args.sampler
        images = to_pil(generate(model, [args.prompt] * args.batch, args.negative, sampler=args.sampler,
                                 steps=args.steps, cfg=args.cfg, seed=seeds, height=height, width=width,
                                 karras=args.karras, eta=args.eta, spacing=args.spacing, slice_size=args.vae_slice,
                                 cfg_rescale=args.cfg_rescale,
                                 progress=label if progress else False))
        suffix = f"-lora{factor:g}" if factor is not None else ""
        for s, image in zip(seeds, images):
            written.append(save_png(image, args.out / f"{index:05d}-{s}{suffix}.png", parameters(s, factor)))
            index += 1
        columns.append(images)

    if scales is not None:
        # Rows are seeds, columns are scales: the same image at each multiplier reads left to right.
        cells = [columns[c][r] for r in range(args.batch) for c in range(len(scales))]
        sheet = grid(cells, cols=len(scales), col_labels=[f"LoRA x{s:g}" for s in scales],
                     row_labels=[f"seed {s}" for s in seeds] if args.batch > 1 else None)
        extra = {"LoRA scales": ", ".join(f"{s:g}" for s in scales)}
        written.append(save_png(sheet, args.out / f"grid-{first_index:05d}-lora-scales.png",
                                parameters(seed, None, extra)))
    elif args.grid:
        written.append(save_png(grid(columns[0]), args.out / f"grid-{first_index:05d}.png", parameters(seed, None)))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""sd.load: an original SD 1.x/2.x/XL checkpoint -> StableDiffusion, built on meta and filled straight in the target dtype."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

import fastpaths
from schedule import PREDICTION_TYPES
from text import ClipLConfig, ClipLTextEncoder, OpenClipConfig, OpenClipTextEncoder, SDXLTextConfig, SDXLTextEncoder
from text import clip_l, open_clip, sdxl
from unet import UNetConfig, UNetModel
from vae import AutoencoderKL, VAEConfig, scale_factor

from .checkpoint import CheckpointError, CheckpointFile, first, is_ignored
from .model import SDXL_TEXT_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, StableDiffusion, text_prefix
from .tiny import tiny_parts

# OpenCLIP text towers: SD2's under `cond_stage_model.model.`, SDXL's bigG under `conditioner.embedders.1.model.`.
_OPEN_CLIP = (TEXT_PREFIX + "model.", SDXL_TEXT_PREFIX + sdxl.OPEN_CLIP_PREFIX + "model.")


def split_parts(ckpt: CheckpointFile) -> dict[str, dict[str, torch.Tensor]]:
    """Group a file's (meta) tensors by part, with the part prefix stripped. Unknown keys are an error.
    The keys of the result are the file's part prefixes: the text part is `cond_stage_model.` (SD1/SD2)
    or `conditioner.` (SDXL)."""
    keys = ckpt.keys()
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(f"{ckpt.path}: not a Stable Diffusion checkpoint: {_what_is_it(keys)}")
    text = SDXL_TEXT_PREFIX if any(k.startswith(SDXL_TEXT_PREFIX) for k in keys) else TEXT_PREFIX
    parts: dict[str, dict[str, torch.Tensor]] = {UNET_PREFIX: {}, VAE_PREFIX: {}, text: {}}
    unknown = []
    for k in keys:
        prefix = next((p for p in parts if k.startswith(p)), None)
        if k.startswith(tuple(p + "visual." for p in _OPEN_CLIP)):
            continue  # OpenCLIP's image tower, kept by some image-conditioned variants: never read
        if prefix is not None and not is_ignored(k):
            parts[prefix][k[len(prefix):]] = ckpt.shapes[k]
        elif prefix is None and not is_ignored(k) and k != "v_pred":
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{ckpt.path}: unexpected tensors that belong to no SD part: {first(unknown)}")
    for prefix, part in parts.items():
        if not part:
            raise CheckpointError(f"{ckpt.path}: no tensors under {prefix!r}: this file lacks that part of the model")
    return parts


def _what_is_it(keys: list[str]) -> str:
    """A helpful guess at what a non-SD1/SD2 file is."""
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "this is a LoRA file; apply it to a base model with lora.load"
    if any(k.startswith("down_blocks.") or k.startswith("unet.") for k in keys):
        return "this looks like a diffusers-format file; pass the original single-file checkpoint instead"
    if any(k.startswith("encoder.down.") for k in keys):
        return "this looks like a standalone VAE file"
    return f"no key starts with {UNET_PREFIX!r}; the file starts with {first(keys, 5)}"


def detect_version(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """'sd1' for CLIP-L text encoders, 'sd2' for OpenCLIP, 'sdxl' for sgm's conditioner with CLIP-L + OpenCLIP."""
    if SDXL_TEXT_PREFIX in parts:
        text = parts[SDXL_TEXT_PREFIX]
        has = lambda p: any(k.startswith(p) for k in text)  # noqa: E731
        if has(sdxl.CLIP_L_PREFIX + "transformer.") and has(sdxl.OPEN_CLIP_PREFIX + "model."):
            return "sdxl"
        if has(sdxl.CLIP_L_PREFIX + "model."):
            raise CheckpointError("this looks like the SDXL refiner (one OpenCLIP tower as conditioner.embedders.0), "
                                  "which is not supported; use the SDXL base file")
        raise CheckpointError(f"unknown SDXL conditioner: expected {SDXL_TEXT_PREFIX}{sdxl.CLIP_L_PREFIX}transformer.* "
                              f"and {SDXL_TEXT_PREFIX}{sdxl.OPEN_CLIP_PREFIX}model.*; keys start with {first(text, 5)}")
    text = parts[TEXT_PREFIX]
    if any(k.startswith("transformer.") for k in text):
        return "sd1"
    if any(k.startswith("model.") for k in text):
        return "sd2"
    raise CheckpointError(f"unknown text encoder: cond_stage_model keys start with {first(text, 5)}")


def detect_prediction_type(ckpt: CheckpointFile, version: str) -> str:
    """epsilon or v_prediction. SD1 is always epsilon. SD2 512-base (eps) and 768-v share every shape,
    so use the file's own word when it has one, and otherwise the heuristic that other SD tools use:
    the v-model's last output transformer has visibly larger norm1 biases (std > 0.09)."""
    if version == "sd1":
        return "epsilon"
    spec = ckpt.metadata.get("modelspec.prediction_type", "")
    if spec in ("v", "v_prediction"):
        return "v_prediction"
    if spec == "epsilon":
        return "epsilon"
    if "v_pred" in ckpt.shapes:
        return "v_prediction"
    if version == "sdxl":  # SDXL base is epsilon; the norm heuristic below was tuned on SD2 only
        return "epsilon"
    probe = [k for k in ckpt.shapes if k.startswith(UNET_PREFIX + "output_blocks.") and k.endswith("transformer_blocks.0.norm1.bias")]
    if probe:
        last = max(probe, key=lambda k: int(k[len(UNET_PREFIX + "output_blocks."):].split(".")[0]))
        if ckpt.read(last).float().std(unbiased=False) > 0.09:
            return "v_prediction"
    return "epsilon"


def check_fits(model: nn.Module, part: Mapping[str, torch.Tensor], where: str) -> None:
    """The one check that a state dict fits a model: missing, unexpected and mis-shaped keys, all listed, raised as
    one CheckpointError naming `where`. sd.load runs it on every part before a single weight is read."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(part))
    unexpected = sorted(set(part) - set(expected))
    wrong = [f"{k}: file {tuple(part[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in part and part[k].shape != v.shape]
    problems = [f"{label}: {first(ks)}" for label, ks in
                (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if ks]
    if problems:
        raise CheckpointError(f"{where} does not fit the inferred architecture; " + "; ".join(problems))


def build_models(ckpt: CheckpointFile, parts: Mapping[str, Mapping[str, torch.Tensor]], version: str,
                 text_layer: str | None) -> dict[str, nn.Module]:
    """Infer each architecture from shapes and build it on the meta device; raise with the file name on any mismatch.

    parts: split_parts(ckpt); version: detect_version(parts); text_layer: None for the family default.
    Returns {part prefix ('model.diffusion_model.', 'first_stage_model.', the text prefix): meta module}.
    No weight is read: build_meta() is the one-call form that also opens the file and detects the version.
    """
    text = text_prefix(version)
    text_prepare = text_state_dict_preparer(version)
    if version == "sdxl":
        if text_layer is not None:
            raise CheckpointError(f"{ckpt.path}: text_layer={text_layer!r} is for SD1/SD2; SDXL's layers are fixed "
                                  "(both towers' penultimate hidden states)")
        build_text = lambda p: SDXLTextEncoder(SDXLTextConfig.from_state_dict(p))  # noqa: E731
    else:
        text_cls, text_cfg = ((ClipLTextEncoder, ClipLConfig) if version == "sd1"
                              else (OpenClipTextEncoder, OpenClipConfig))
        build_text = lambda p: _text_encoder(text_cls, text_cfg.from_state_dict(p), text_layer)  # noqa: E731
    models = {}
    for prefix, build in (
        (UNET_PREFIX, lambda p: UNetModel(UNetConfig.from_state_dict(p))),
        (VAE_PREFIX, lambda p: AutoencoderKL(VAEConfig.from_state_dict(p))),
        (text, lambda p: build_text(text_prepare(p))),
    ):
        where = f"{ckpt.path} [{prefix}*]"
        try:
            with torch.device("meta"):
                models[prefix] = build(parts[prefix])
        except ValueError as err:
            raise CheckpointError(f"{where}: {err}") from err
        shapes = text_prepare(parts[prefix]) if prefix == text else parts[prefix]
        check_fits(models[prefix], shapes, where)
    if version == "sdxl":
        _check_sdxl_sizes(ckpt, models[UNET_PREFIX].cfg, models[text].config)
    return models


def text_state_dict_preparer(version: str):
    """The function that brings a file's text-encoder tensors (part prefix stripped) to the module's keys."""
    return {"sd1": clip_l.prepare_state_dict, "sd2": open_clip.prepare_state_dict,
            "sdxl": sdxl.prepare_state_dict}[version]


def _check_sdxl_sizes(ckpt: CheckpointFile, unet: UNetConfig, text: SDXLTextConfig) -> None:
    """The UNet must read what the towers give: context = both widths, y = pooled + six size embeddings."""
    if unet.context_dim != text.width or unet.adm_in_channels != text.adm_in_channels:
        raise CheckpointError(
            f"{ckpt.path}: the UNet expects context {unet.context_dim} and y {unet.adm_in_channels}, but the text "
            f"encoders give context {text.clip_l.width} + {text.open_clip.width} = {text.width} and y = pooled "
            f"{text.pooled_dim} + {sdxl.SIZE_FIELDS} x {sdxl.SIZE_EMBED_DIM} = {text.adm_in_channels}")


def _text_encoder(cls: type, cfg, layer: str | None) -> nn.Module:
    """The family default layer, except for SD2 files converted back from diffusers: those hold only the 23 blocks
    SD2 runs (no last block, no projection), so their "last" block is SD2's penultimate one."""
    if layer is None and cls is OpenClipTextEncoder and cfg.layers == 23 and cfg.embed_dim is None:
        layer = "last"
    return cls(cfg, layer=layer) if layer else cls(cfg)


def _open(path: str | os.PathLike, text_layer: str | None):
    """(opened file, its tensors by part, version, {prefix: meta module}): everything but the weights."""
    ckpt = CheckpointFile(path)
    parts = split_parts(ckpt)
    try:
        version = detect_version(parts)
    except CheckpointError as err:
        raise CheckpointError(f"{ckpt.path}: {err}") from err
    return ckpt, parts, version, build_models(ckpt, parts, version, text_layer)


def build_meta(path: str | os.PathLike, text_layer: str | None = None) -> tuple[CheckpointFile, str, dict[str, nn.Module]]:
    """Read only a file's header: check it and build its parts on the meta device, without reading a weight.
    Returns (opened file, version, {prefix: meta module}); used for early checks (sizes, LoRA fit) before loading."""
    ckpt, _, version, models = _open(path, text_layer)
    return ckpt, version, models


def build_preset(name: str) -> dict[str, nn.Module]:
    """A standard architecture on the meta device, without a file: {part prefix: module}, as build_meta gives them.
    "sd1": SD 1.x (CLIP-L), "sd2": SD 2.x (OpenCLIP ViT-H), "tiny": sd.tiny's SD1. Shapes only: no weight exists."""
    presets = {"sd1": (UNetConfig.sd1, lambda: ClipLTextEncoder(ClipLConfig())),
               "sd2": (UNetConfig.sd2, lambda: OpenClipTextEncoder(OpenClipConfig()))}
    if name not in (*presets, "tiny"):
        raise ValueError(f"unknown preset {name!r}; expected one of {[*presets, 'tiny']}")
    with torch.device("meta"):
        if name == "tiny":
            return tiny_parts("sd1")
        unet_cfg, text = presets[name]
        return {UNET_PREFIX: UNetModel(unet_cfg()), VAE_PREFIX: AutoencoderKL(VAEConfig.sd()), TEXT_PREFIX: text()}


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         prediction_type: str | None = None, text_layer: str | None = None,
         fast_paths: bool = True) -> StableDiffusion:
    """Load an original Stable Diffusion 1.x/2.x or SDXL base checkpoint (.safetensors or .ckpt).

    The architecture (widths, levels, blocks, attention levels, depth, context size, text-encoder family)
    is read off the tensors, every key and shape is checked, and only then are the weights read, one
    tensor at a time, straight into `dtype` on `device`: no full fp32 copy is ever made.

    prediction_type: "epsilon" or "v_prediction" to override detection (SD2 512 and 768-v files have the
    same shapes). text_layer: "last" or "penultimate" to override the family default (SD1 last, SD2 penultimate;
    not for SDXL, whose two towers always give their penultimate hidden states).
    SDXL's VAE overflows in float16 (it gives NaN/inf images), so with dtype=float16 an SDXL VAE stays in float32
    (UNet and text encoders in float16); float32 (the default) and bfloat16 apply to every part.
    fast_paths: swap in the faster layers of fastpaths/ (fastpaths.apply: same weights and keys); False keeps the
    plain architecture.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    ckpt, parts, version, models = _open(path, text_layer)
    for prefix, model in models.items():
        # SDXL's VAE overflows in float16 (NaN/inf images): keep it in float32 then, as diffusers' force_upcast does.
        part_dtype = torch.float32 if version == "sdxl" and prefix == VAE_PREFIX and dtype == torch.float16 else dtype
        tensors = {k: ckpt.read(prefix + k, part_dtype, device) for k in parts[prefix]}
        if prefix == text_prefix(version):
            tensors = text_state_dict_preparer(version)(tensors)
        model.load_state_dict(tensors, strict=True, assign=True)
        if hasattr(model, "materialize_buffers"):
            model.materialize_buffers(device)
    for model in models.values():
        model.eval().requires_grad_(False)
        if fast_paths:
            fastpaths.apply(model)
    return StableDiffusion(
        unet=models[UNET_PREFIX], vae=models[VAE_PREFIX], text_encoder=models[text_prefix(version)],
        version=version, prediction_type=prediction_type or detect_prediction_type(ckpt, version),
        scale_factor=scale_factor(version), source=ckpt.path,
    )

"""The lab's state: one checkpoint and its adapters, each adapted layer kept as the SVD of its update ΔW.

Each file goes through lora.load (every format it reads: kohya, LyCORIS LoCon/LoHa/LoKr/DoRA/Tucker, diffusers/peft,
packed q/k/v), its layers' updates are read off at multiplier 1 and the file's alpha, and the layers are taken out
again: the model stays the plain base, and a render writes W0 + ΔW at the page's settings into the weights
(render.py). A plain LoRA's SVD comes from its factors (r values); any other adapter's from its dense ΔW.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lora
import sd
from analysis import spectral
from analysis.deltas import block_of
from lora import packed
from lora.io import model_parts

from .rank import update_svd
from .settings import Settings


@dataclass
class LayerUpdate:
    """One adapted layer of one file: ΔW = U·diag(S)·Vh at multiplier 1 and the file's alpha."""

    name: str                  # module path in the UNet; text-encoder layers get their part as prefix ('te:...')
    part: str                  # 'unet', 'te', or SDXL's 'te1' / 'te2'
    path: str                  # module path inside that part
    group: str                 # one of settings.GROUPS
    kind: str                  # one of settings.KINDS
    block: str                 # 'input_blocks.4', 'middle_block', 'te:layers.3', ...
    shape: tuple[int, ...]     # the weight's shape
    adapter: str               # 'lora', 'dora', 'loha', 'lokr', 'lora+tucker', 'packed'
    rank: int                  # a LoRA's r; other adapters: the numerical rank of ΔW
    alpha: float               # the file's alpha for this layer (scale = alpha/r, or alpha/sqrt(r))
    u: torch.Tensor            # (m, rank) float32, on the model's device
    s: torch.Tensor            # (rank,) float32, decreasing
    vh: torch.Tensor           # (rank, n) float32


@dataclass
class Adapter:
    """One file given with --lora."""

    label: str
    path: str
    layers: dict[str, LayerUpdate]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=1)

    @property
    def kind(self) -> str:
        return "+".join(sorted({layer.adapter for layer in self.layers.values()})) or "lora"


@dataclass
class Lab:
    """The model (weights at W0 between renders), its adapters, and each adapted weight with a copy of its W0."""

    ckpt: str
    model: sd.StableDiffusion
    adapters: list[Adapter]
    weights: dict[str, tuple[nn.Parameter, torch.Tensor]]   # layer name -> (the model's weight, a copy of W0)
    width: int
    height: int
    defaults: Settings

    @property
    def layer_names(self) -> set[str]:
        return set(self.weights)

    @property
    def max_rank(self) -> int:
        return max((a.max_rank for a in self.adapters), default=1)


def group_of(part: str, path: str) -> str:
    if part != "unet":
        return "text"
    for prefix, group in (("input_blocks", "down"), ("middle_block", "mid"), ("output_blocks", "up")):
        if path.startswith(prefix + "."):
            return group
    return "other"


def kind_of(part: str, path: str) -> str:
    """'attention' for a transformer's layers (attention, proj_in/out, ff; every text-encoder layer), else 'conv'."""
    if part != "unet" or ".transformer_blocks." in path or re.search(r"\.(proj_in|proj_out)$", path):
        return "attention"
    return "conv"


def layer_name(part: str, path: str) -> str:
    return path if part == "unet" else f"{part}:{path}"


def stored_weight(module: nn.Module) -> nn.Parameter:
    """The tensor a render writes: a Linear/Conv's weight, or a packed attention's stored in_proj_weight."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module.weight
    return packed.base_weight(module)


def read_adapter(model: sd.StableDiffusion, path: str | Path, label: str, tag: str) -> Adapter:
    """The file's layers as SVDs of their updates, read through lora.load on `model` and taken out again."""
    parts = model_parts(model)
    loaded = lora.load(path, model, name=tag, dtype=torch.float32)
    device = model.device
    layers: dict[str, LayerUpdate] = {}
    try:
        for part, module in parts.items():
            for mpath, layer in lora.named_lora_layers(module, tag):
                plain = type(layer) in (lora.LoRALinear, lora.LoRAConv) and getattr(layer, "lora_mid", None) is None
                if plain:
                    up = layer.lora_up.weight.detach().flatten(1)
                    down = layer.lora_down.weight.detach().flatten(1)
                    u, s, vh = update_svd(up=up, down=down, scale=layer.scale)
                    rank, adapter = layer.rank, "lora"
                else:
                    u, s, vh = update_svd(layer.delta_weight(1.0))
                    rank = max(1, int(spectral.numerical_rank(s)))  # drop directions at rounding level
                    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
                    adapter = "packed" if isinstance(layer, packed.PackedLoRA) else layer.kind
                    if getattr(layer, "lora_mid", None) is not None:
                        adapter = "lora+tucker"
                alpha = layer.alpha[layer.slices[0]] if isinstance(layer.alpha, dict) else layer.alpha
                name = layer_name(part, mpath)
                block = block_of(mpath) if part == "unet" else f"{part}:{block_of('te:' + mpath).removeprefix('te:')}"
                layers[name] = LayerUpdate(
                    name=name, part=part, path=mpath, group=group_of(part, mpath), kind=kind_of(part, mpath),
                    block=block, shape=tuple(layer.weight.shape), adapter=adapter, rank=int(rank), alpha=float(alpha),
                    u=u.float().contiguous().to(device), s=s.float().to(device), vh=vh.float().contiguous().to(device))
    finally:
        for module in parts.values():
            lora.remove(module, tag)
    return Adapter(label=label, path=str(path), layers=layers, metadata=dict(loaded.metadata))


def open_lab(ckpt: str | Path, loras: list[str | Path], *, labels: list[str] | None = None,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", size: int | None = None,
             defaults: Settings | None = None) -> Lab:
    """Load the checkpoint and read each adapter file (labels default to the file names, made unique).

    size: the image side (default: the model's own, 32 for the built-in toy, 1024 for SDXL, else 512)."""
    from analysis.deltas import default_label, unique_labels
    from sample import default_size

    model = sd.load(ckpt, dtype=dtype, device=device)
    labels = unique_labels(labels or [default_label(p) for p in loras])
    adapters = [read_adapter(model, p, label, f"_lab{i}") for i, (p, label) in enumerate(zip(loras, labels))]
    parts = model_parts(model)
    weights: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for adapter in adapters:
        for name, layer in adapter.layers.items():
            if name not in weights:
                w = stored_weight(parts[layer.part].get_submodule(layer.path))
                weights[name] = (w, w.detach().clone())
    side = size or default_size(model.version, Path(ckpt))
    if defaults is None:
        defaults = default_settings(ckpt)
    return Lab(ckpt=str(ckpt), model=model, adapters=adapters, weights=weights, width=side, height=side,
               defaults=defaults)


def default_settings(ckpt: str | Path) -> Settings:
    """The toy's usual sampling (DDIM, 20 steps, guidance 5, its held-out colour) or SD's (DPM++ 2M, 25, 7.5)."""
    from toy.hooks import is_builtin_toy

    if is_builtin_toy(ckpt):
        return Settings(prompt="a large purple circle in the center, white background", steps=20, cfg=5.0,
                        sampler="ddim", images=2)
    return Settings(prompt="a photo of a cat", steps=25, cfg=7.5, sampler="dpmpp_2m", images=1)

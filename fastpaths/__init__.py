"""The CPU speed paths, kept out of the model files and applied in one place: `fastpaths.apply(model)`.

    model = sd.load(path)                      # sd.load applies them (fast_paths=False: not)
    fastpaths.apply(unet)                      # a UNet or VAE built by hand gets them the same way
    with fastpaths.switched(winograd_conv=False): ...

apply() swaps the layers of UNets and VAEs in place for the subclasses in layers.py: the same objects, parameters
and state-dict keys, only a faster forward (or a backward that keeps less). Which paths run is one switch object,
SWITCHES (switches.py); the C++ kernels (*.cpp) are built on first use where the CPU has AVX-512 BF16 (build.py).
"""

from __future__ import annotations

from torch import nn

from unet.model import GEGLU, CrossAttention, SpatialTransformer, UNetModel
from vae.model import AutoencoderKL

from . import layers
from .switches import SWITCHES, Switches, switched

__all__ = ["SWITCHES", "Switches", "apply", "switched"]

# Architecture class -> its fast version, per model. Exact types only, so a layer is swapped once.
_UNET = {nn.Conv2d: layers.Conv2d, CrossAttention: layers.CrossAttention, GEGLU: layers.GEGLU,
         SpatialTransformer: layers.SpatialTransformer}
_VAE = {nn.Conv2d: layers.WinogradConv2d}


def apply(model: nn.Module) -> nn.Module:
    """Give every UNet and VAE in `model` (itself or below it) its fast layers, in place; returns `model`."""
    for part in model.modules():
        table = _UNET if isinstance(part, UNetModel) else _VAE if isinstance(part, AutoencoderKL) else None
        for module in part.modules() if table else ():
            fast = table.get(type(module))
            if fast is not None:
                module.__class__ = fast  # a subclass with no state of its own: only the forward changes
    return model

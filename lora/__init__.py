"""Adapters for Stable Diffusion: LoRA, DoRA, LoHa and LoKr layers on one base, injection by module path, merging,
and kohya/LyCORIS/diffusers files."""

from .base import Adapter
from .dora import DoRAConv, DoRALinear
from .inject import (ADAPTER_OPTIONS, ADAPTERS, PRESETS, base_state_dict, freeze_base, inject, lora_layers,
                     lora_parameters, merge, merged_state_dict, named_lora_layers, remove, report, set_multiplier,
                     unmerge)
from .io import LoadedLoRA, load, lora_state_dict, save
from .layer import LoRAConv, LoRALinear, wrap
from .loha import LoHa
from .lokr import LoKr, factorization
from .names import diffusers_name, kohya_name, unet_to_diffusers
from .packed import PackedLoRA

__all__ = [
    "ADAPTERS", "ADAPTER_OPTIONS", "Adapter", "DoRAConv", "DoRALinear", "LoHa", "LoKr", "LoRAConv", "LoRALinear",
    "LoadedLoRA", "PRESETS", "PackedLoRA", "base_state_dict", "diffusers_name", "factorization", "freeze_base",
    "inject", "kohya_name", "load", "lora_layers", "lora_parameters", "lora_state_dict", "merge", "merged_state_dict",
    "named_lora_layers", "remove", "report", "save", "set_multiplier", "unet_to_diffusers", "unmerge", "wrap",
]

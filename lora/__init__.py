"""LoRA for Stable Diffusion: low-rank layers, injection by module path, merging, and kohya/diffusers files."""

from .inject import (PRESETS, base_state_dict, freeze_base, inject, lora_layers, lora_parameters, merge,
                     merged_state_dict, named_lora_layers, remove, report, set_multiplier, unmerge)
from .io import LoadedLoRA, load, lora_state_dict, save
from .layer import LoRAConv, LoRALinear, wrap
from .names import diffusers_name, kohya_name, unet_to_diffusers

__all__ = [
    "LoRAConv", "LoRALinear", "LoadedLoRA", "PRESETS", "base_state_dict", "diffusers_name", "freeze_base",
    "inject", "kohya_name", "load", "lora_layers", "lora_parameters", "lora_state_dict", "merge", "merged_state_dict",
    "named_lora_layers", "remove", "report", "save", "set_multiplier", "unet_to_diffusers", "unmerge", "wrap",
]

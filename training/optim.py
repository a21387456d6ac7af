"""The optimizer (AdamW, 8-bit AdamW, LoRA+ groups) and the learning-rate schedule with warm-up."""
from __future__ import annotations

import math

import torch
from torch import nn


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up, then
    constant, linear decay to 0, or half-cosine decay to 0 over the remaining steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected constant, linear or cosine")


def param_groups(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 loraplus_ratio: float = 0.0, group: str = "unet") -> list[dict]:
    """One group, or two for LoRA+ (Hayou et al. 2024): B (lora_up) learns `ratio` times faster than A."""
    if loraplus_ratio and loraplus_ratio != 1.0:
        up = [p for n, p in named if "lora_up" in n]
        rest = [p for n, p in named if "lora_up" not in n]
        return [dict(params=rest, lr=lr, initial_lr=lr, weight_decay=weight_decay, name=f"{group}.A"),
                dict(params=up, lr=lr * loraplus_ratio, initial_lr=lr * loraplus_ratio, weight_decay=weight_decay,
                     name=f"{group}.B")]
    return [dict(params=[p for _, p in named], lr=lr, initial_lr=lr, weight_decay=weight_decay, name=group)]


def make_optimizer(groups: list[dict], kind: str, device: torch.device) -> torch.optim.Optimizer:
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes)") from None
        if device.type != "cuda":
            raise ValueError("optimizer adamw8bit runs on CUDA only; use adamw on this device")
        return bnb.optim.AdamW8bit(groups)
    # foreach kernels are the fast path on CPU and GPU alike; fused needs every param on CUDA.
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor

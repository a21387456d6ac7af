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


class AdamW:
    """AdamW (Loshchilov & Hutter), written out. Per parameter θ with gradient g, at step t:

        θ ← θ·(1 − lr·λ)                                   decoupled weight decay
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²    moving averages of g and g²
        θ ← θ − lr/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + ε)     bias-corrected step

    the same operations, in the same order, as torch.optim.AdamW(foreach=True), so the two agree bit for bit.
    Why not that class: constructing any torch.optim.Optimizer imports torch._dynamo, about 70 MiB of resident
    memory on CPU that a LoRA run which never compiles does not need (bench/README.md). What train.py and
    torch.amp.GradScaler use is here: param_groups, step(), zero_grad(), state_dict() and load_state_dict(),
    with torch.optim.AdamW's state_dict layout, so a training state saved by either loads into the other.
    """

    def __init__(self, groups: list[dict], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict] = {}  # parameter -> {"step": t, "exp_avg": m, "exp_avg_sq": v}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p not in self.state:
                    self.state[p] = {"step": 0.0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for s in states:
                s["step"] += 1
            if decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            steps = [s["step"] for s in states]
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [(1 - beta2 ** t) ** 0.5 for t in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** t) for t in steps])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters numbered in group order; "step" as a float tensor."""
        index = {p: i for i, p in enumerate(self._params())}
        state = {index[p]: {"step": torch.tensor(s["step"]), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
                 for p, s in self.state.items()}
        groups, start = [], 0
        for g in self.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        """Restore moments, steps and hyperparameters (lr included), as torch.optim does; the groups must match."""
        groups = saved["param_groups"]
        ours = [len(g["params"]) for g in self.param_groups]
        theirs = [len(g["params"]) for g in groups]
        if ours != theirs:
            raise ValueError(f"optimizer state has parameter groups of sizes {theirs}, this run has {ours}: "
                             "resume with the same trainable parameters")
        params = self._params()
        for p, i in zip(params, (i for g in groups for i in g["params"])):
            if i in saved["state"]:
                s = saved["state"][i]
                if s["exp_avg"].shape != p.shape:
                    raise ValueError(f"optimizer state {i} has shape {tuple(s['exp_avg'].shape)}, "
                                     f"its parameter {tuple(p.shape)}")
                self.state[p] = {"step": float(s["step"]),
                                 "exp_avg": s["exp_avg"].to(p.device, p.dtype),
                                 "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype)}
        for g, saved_group in zip(self.param_groups, groups):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved_group.items() if k != "params"})


def make_optimizer(groups: list[dict], kind: str, device: torch.device) -> AdamW | torch.optim.Optimizer:
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes)") from None
        if device.type != "cuda":
            raise ValueError("optimizer adamw8bit runs on CUDA only; use adamw on this device")
        return bnb.optim.AdamW8bit(groups)
    return AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def set_lr(optimizer: AdamW | torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor

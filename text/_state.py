"""Small helpers shared by the text encoders for reading shapes out of a checkpoint and checking it fits a model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_LIST_AT_MOST = 8  # long key lists are cut so the error stays readable


def _short(items: list[str]) -> str:
    head = ", ".join(items[:_LIST_AT_MOST])
    return head + (f", ... ({len(items)} in all)" if len(items) > _LIST_AT_MOST else "")


def shape_of(sd: Mapping[str, torch.Tensor], key: str, ndim: int, what: str) -> tuple[int, ...]:
    """Shape of sd[key], with a ValueError naming the key when it is absent or has the wrong rank."""
    if key not in sd:
        sample = sorted(sd)[:5]
        raise ValueError(f"{what}: required key {key!r} not found (the state dict starts with {sample})")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{what}: {key!r} should have {ndim} dims, got shape {shape}")
    return shape


def block_count(sd: Mapping[str, torch.Tensor], prefix: str, what: str) -> int:
    """Number of numbered blocks `prefix{i}.` in sd; they must run 0..n-1 with no gap."""
    heads = [k[len(prefix) :].split(".", 1)[0] for k in sd if k.startswith(prefix)]
    indices = {int(h) for h in heads if h.isdigit()}
    if not indices:
        raise ValueError(f"{what}: no keys start with {prefix!r}<n>.")
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ValueError(f"{what}: blocks under {prefix!r} have gaps, missing indices {missing}")
    return len(indices)


def check_matches(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped keys before load_state_dict would."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k} file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected)
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_short(wrong)}")
    if problems:
        raise ValueError(f"{what} state dict does not fit the model; " + "; ".join(problems))


def check_tokens(tokens: torch.Tensor, vocab_size: int, context_length: int, what: str) -> None:
    """Token ids must be an integer [B, T] tensor with T <= context_length and ids inside the vocabulary."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: tokens must be an int64/int32 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= context_length:
        raise ValueError(
            f"{what}: tokens must have shape [B, T] with 1 <= T <= {context_length}, got {tuple(tokens.shape)}"
        )
    if tokens.device.type != "meta" and tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"{what}: token ids must lie in [0, {vocab_size}), got min {int(tokens.min())} max {int(tokens.max())}"
        )

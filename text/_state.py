"""Small helpers shared by the text encoders for reading shapes out of a checkpoint and checking token ids."""

from __future__ import annotations

from collections.abc import Mapping

import torch


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

"""Rank truncation: an update ΔW cut to its best rank-k approximation, read off its singular value decomposition.

By the Eckart–Young theorem the best rank-k approximation of ΔW = U·diag(S)·Vh (in the Frobenius and the spectral
norm) keeps the k largest singular values: ΔW_k = U[:, :k]·diag(S[:k])·Vh[:k]. Its error is the energy left out,
‖ΔW − ΔW_k‖_F² = Σ_{i>k} S_i², so the share of ‖ΔW‖_F² that rank k keeps is Σ_{i≤k} S_i² / Σ S_i².
"""
from __future__ import annotations

import torch

from analysis import spectral


def update_svd(delta: torch.Tensor | None = None, *, up: torch.Tensor | None = None, down: torch.Tensor | None = None,
               scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of ΔW, float64, singular values decreasing.

    A LoRA gives its factors, ΔW = scale·up@down with up (m, r) and down (r, n): only an r x r core is decomposed and
    U, S, Vh have r columns / values. Any other update gives ΔW itself as an (m, n) matrix (a conv kernel flattened
    to (out, in·kh·kw)), and keeps min(m, n) of them."""
    if up is not None and down is not None:
        return spectral.lowrank_svd(up, down, scale)
    if delta is None:
        raise ValueError("update_svd needs ΔW or its factors up and down")
    return spectral.svd(delta.flatten(1))


def best_rank_k(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int | None) -> torch.Tensor:
    """ΔW_k = U[:, :k]·diag(S[:k])·Vh[:k]: the best rank-k approximation of U·diag(S)·Vh (k None, or k at least the
    number of singular values, gives ΔW back)."""
    k = s.shape[-1] if k is None else max(0, min(int(k), s.shape[-1]))
    return (u[:, :k] * s[:k]) @ vh[:k]


def energy_kept(s: torch.Tensor, k: int | None) -> float:
    """Σ_{i≤k} S_i² / Σ S_i²: the share of ‖ΔW‖_F² that rank k keeps (1 for a zero update)."""
    sq = s.double() ** 2
    total = float(sq.sum())
    k = s.shape[-1] if k is None else max(0, min(int(k), s.shape[-1]))
    return float(sq[:k].sum()) / total if total > 0 else 1.0


def frobenius_at_rank(s: torch.Tensor, k: int | None) -> float:
    """‖ΔW_k‖_F = sqrt(Σ_{i≤k} S_i²), without forming ΔW_k."""
    k = s.shape[-1] if k is None else max(0, min(int(k), s.shape[-1]))
    return float((s[:k].double() ** 2).sum().sqrt())

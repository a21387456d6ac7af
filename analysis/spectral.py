"""The linear algebra of the LoRA analyses on stacks of matrices: SVDs, ranks, subspace overlap, amplification.

Every function takes batches (..., m, n) so that many same-shape layers go through one LAPACK call, and works
in float64: the spectra of small updates span many orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

# Matrices at least this many times wider than tall (or taller than wide) are decomposed through their Gram
# matrix: an eigh of the small side is 10-20x faster on CPU than LAPACK's SVD of a 1280 x 11520 conv kernel.
GRAM_ASPECT = 2.0


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """A Linear weight as is; a conv kernel (out, in, kh, kw) as the (out, in·kh·kw) matrix it applies to patches."""
    return w if w.ndim == 2 else w.flatten(1)


def _use_gram(m: int, n: int, method: str) -> bool:
    if method not in ("auto", "gram", "lapack"):
        raise ValueError(f"unknown SVD method {method!r}; expected auto, gram or lapack")
    return method == "gram" or (method == "auto" and max(m, n) >= GRAM_ASPECT * min(m, n))


def svd(a: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD a = U·diag(S)·Vh in float64, singular values in decreasing order, for a stack (..., m, n).

    method "gram" (chosen by "auto" for elongated matrices) diagonalises the small Gram matrix: exact in
    exact arithmetic, and in float64 singular values below ~1e-8·s_max come out as noise. The singular
    vectors on the long side are a·v/s, left at zero where s is zero. "lapack" is torch.linalg.svd.
    """
    a = a.to(torch.float64)
    m, n = a.shape[-2:]
    if not _use_gram(m, n, method):
        return torch.linalg.svd(a, full_matrices=False)
    wide = m <= n
    small = a if wide else a.mT
    evals, evecs = torch.linalg.eigh(small @ small.mT)            # ascending
    s = evals.flip(-1).clamp(min=0).sqrt()
    short = evecs.flip(-1)                                         # singular vectors on the short side
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    long = (short.mT @ small) * inv[..., :, None]                  # (.., k, long): rows are the other vectors
    return (short, s, long) if wide else (long.mT, s, short.mT)


def singular_values(a: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Singular values of a stack (..., m, n), float64, decreasing."""
    a = a.to(torch.float64)
    m, n = a.shape[-2:]
    if not _use_gram(m, n, method):
        return torch.linalg.svdvals(a)
    small = a if m <= n else a.mT
    return torch.linalg.eigvalsh(small @ small.mT).flip(-1).clamp(min=0).sqrt()


def lowrank_svd(up: torch.Tensor, down: torch.Tensor, scale: float | torch.Tensor = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of scale·up@down from its factors, up (..., m, r) and down (..., r, n): U (m, r), S (r,), Vh (r, n).

    QR of both factors leaves an r x r core; only that core is decomposed, so a LoRA's update is analysed
    in O((m+n)·r²) without ever forming the m x n matrix.
    """
    up, down = up.to(torch.float64), down.to(torch.float64)
    qu, ru = torch.linalg.qr(up)                 # up = qu·ru
    qd, rd = torch.linalg.qr(down.mT)            # down = rd^T·qd^T
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if scale.ndim:  # one scale per matrix of the stack
        scale = scale[..., None, None]
    core = (ru @ rd.mT) * scale
    uc, s, vhc = torch.linalg.svd(core)
    return qu @ uc, s, vhc @ qd.mT


# ---------------------------------------------------------------------------------------------- ranks

def energy(s: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of ||ΔW||_F² held by the top-k singular directions, k = 1..len(s)."""
    sq = s.to(torch.float64) ** 2
    total = sq.sum(-1, keepdim=True)
    return torch.where(total > 0, sq.cumsum(-1) / total.clamp(min=torch.finfo(torch.float64).tiny), 1.0)


def energy_rank(s: torch.Tensor, fraction: float = 0.9) -> torch.Tensor:
    """The smallest k whose top-k directions hold `fraction` of the energy (0 for a zero matrix).

    This is the "rank needed to explain 90% of the variance" of Biderman et al., LoRA Learns Less and
    Forgets Less (2024). A tiny slack keeps an exact rank-r matrix at r despite rounding.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    e = energy(s)
    k = (e < fraction - 1e-12).sum(-1) + 1
    return torch.where(s[..., 0] > 0, k.clamp(max=s.shape[-1]), torch.zeros_like(k))


def stable_rank(s: torch.Tensor) -> torch.Tensor:
    """||ΔW||_F² / ||ΔW||_2²: a rank that does not count tiny singular values (0 for a zero matrix)."""
    s = s.to(torch.float64)
    top = s[..., 0]
    return torch.where(top > 0, (s ** 2).sum(-1) / top.clamp(min=torch.finfo(torch.float64).tiny) ** 2, 0.0)


def numerical_rank(s: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """How many singular values exceed rtol·s_max (rtol well above the float64 Gram path's ~1e-8 noise floor)."""
    return (s > rtol * s[..., :1]).sum(-1)


# ------------------------------------------------------------------------------------------ subspaces

def subspace_similarity(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ||V1[:, :i]^T V2[:, :j]||_F² / min(i, j) for all i <= r1, j <= r2 (Hu et al. 2021, eq. 4).

    v1 (..., k, r1) and v2 (..., k, r2) have orthonormal columns, most important first. Returns (..., r1, r2):
    1 where one span contains the other, 0 where they are orthogonal.
    """
    c2 = (v1.to(torch.float64).mT @ v2.to(torch.float64)) ** 2
    cum = c2.cumsum(-2).cumsum(-1)
    r1, r2 = c2.shape[-2:]
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def right_singular_vectors(a: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The top-k right singular vectors of a stack (..., r, n) as columns (..., n, k): the row space of A."""
    _, _, vh = svd(a)
    return vh[..., :k, :].mT if k else vh.mT


def random_orthonormal(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthonormal columns (..., n, k) from the QR of a Gaussian matrix (signs fixed by R's diagonal)."""
    g = torch.randn(*shape, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def expected_random_similarity(r1: int, r2: int, n: int) -> torch.Tensor:
    """E[φ(i, j)] for independent random subspaces of R^n: i·j/n / min(i, j) = max(i, j)/n."""
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / n


# ------------------------------------------------------------------------------------- amplification

def projection_norm(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """||U^T W V||_F: how much of W lives in the r-dimensional input/output directions U (m, r), V (n, r)."""
    return torch.linalg.matrix_norm(u.mT @ w.to(torch.float64) @ v)


def amplification(delta: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor], w: torch.Tensor,
                  ranks: Sequence[int], generator: torch.Generator,
                  w_svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> list[dict[str, float]]:
    """The LoRA paper's Table 7 numbers for one layer (Hu et al. 2021, sec. 7.3), for each rank r in `ranks`.

    delta: ΔW (m, n), or its SVD (U, S, Vh) when that is already known. w: the base weight W (m, n).
    Returns ||U^T W V||_F with U, V the top-r singular directions of ΔW, of W itself, and random ones,
    plus ||W||_F, ||ΔW||_F and the amplification factor ||ΔW||_F / ||U_ΔW^T W V_ΔW||_F.
    """
    w = w.to(torch.float64)
    du, ds, dvh = svd(delta) if isinstance(delta, torch.Tensor) else delta
    wu, ws, wvh = w_svd if w_svd is not None else svd(w)
    fro_w = float(torch.linalg.matrix_norm(w))
    fro_d = float(ds.norm())
    out = []
    for r in ranks:
        r = min(int(r), ds.shape[-1])
        proj_d = float(projection_norm(w, du[:, :r], dvh[:r].mT))
        proj_w = float(ws[:r].norm())  # U_W^T W V_W = diag(top-r singular values)
        ru = random_orthonormal((w.shape[0], r), generator)
        rv = random_orthonormal((w.shape[1], r), generator)
        proj_r = float(projection_norm(w, ru, rv))
        out.append({"r": r, "fro_W": fro_w, "fro_dW": fro_d, "proj_dW": proj_d, "proj_W": proj_w,
                    "proj_random": proj_r, "amplification": fro_d / proj_d if proj_d > 0 else float("inf")})
    return out


# ------------------------------------------------------------------------------------------ intruders

def best_cosines(top: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """For each column of `top` (..., m, k), its largest |cosine| with any column of `basis` (..., m, p)."""
    return (top.to(torch.float64).mT @ basis.to(torch.float64)).abs().amax(-1)


def intruder_counts(best: torch.Tensor, thresholds: Sequence[float]) -> list[int]:
    """How many top singular vectors are intruders (best cosine with every base vector below ε), per ε."""
    return [int((best < eps).sum()) for eps in thresholds]


# ------------------------------------------------------------------------------------------ truncation

def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (up (m, r), down (r, n)) with up@down the best rank-r approximation; sqrt(S) goes to each side."""
    root = s[..., :rank].sqrt()
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


# ------------------------------------------------------------------------------------------ batching

def batched(items: Sequence[Any], key: Callable[[Any], Any], load: Callable[[Any], tuple[torch.Tensor, ...]],
            fn: Callable[..., tuple[torch.Tensor, ...]], *, desc: str = "", max_bytes: int = 256 * 2**20,
            progress: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """fn over every item, with items of equal key(item) (their shapes) stacked into one call.

    load(item) gives a tuple of tensors; fn gets those tuples stacked along a new first dimension and returns
    a tuple of batched results. Items are loaded only when their batch runs, and a batch holds about max_bytes
    of input at most, so peak memory stays bounded whatever the model size. Returns each item's result tuple.
    """
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    results: list[tuple[torch.Tensor, ...] | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="layer", disable=not progress, leave=False)
    for idx in groups.values():
        pending = list(idx)
        first = load(items[pending[0]])
        per_batch = max(1, max_bytes // max(1, sum(t.numel() for t in first) * 8))
        cache = {pending[0]: first}
        while pending:
            chunk, pending = pending[:per_batch], pending[per_batch:]
            loaded = [cache.pop(i) if i in cache else load(items[i]) for i in chunk]
            out = fn(*(torch.stack(parts) for parts in zip(*loaded)))
            for b, i in enumerate(chunk):
                # A copy, not a view: a view of a cut-down U would keep the whole batch's U alive.
                results[i] = tuple(o[b].clone() for o in out)
            del loaded, out
            bar.update(len(chunk))
    bar.close()
    return results  # type: ignore[return-value]

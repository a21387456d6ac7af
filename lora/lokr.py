"""LoKr (LyCORIS; Edalati et al. 2022, KronA): the update is a Kronecker product of a small and a large matrix,

    ΔW = s · (W1 ⊗ W2),   W1: (a, c),  W2: (b, d),  out = a·b,  in = c·d,

with (a, b) and (c, d) split off by LyCORIS's `factor` rule (factorization() below). W2 is low rank, lokr_w2_a·lokr_w2_b
(inner size r), unless r ≥ max(b, d)/2 or full_matrix, when it is one full matrix lokr_w2. W1 is the full lokr_w1,
or with decompose_both lokr_w1_a·lokr_w1_b when r < max(a, c)/2. For a kxk conv the kernel lives in W2
((b, d, kh, kw) full, or lokr_w2_b of shape (r, d·kh·kw)); with tucker=True in a core lokr_t2 (r, r, kh, kw) between
lokr_w2_a (r, b) and lokr_w2_b (r, d). s = alpha/r when some factor is low rank; with both factors full there is no
rank and s = 1, as LyCORIS and ComfyUI read such files.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, tucker as tucker_product


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """dim = m·n with m ≤ n: (factor, dim/factor) when factor divides dim; otherwise m is the largest divisor of dim
    not above `factor` (any, for factor ≤ 0), walking the divisors upwards only until the pair is balanced.
    The rule of LyCORIS's factorization(): 128 -> (8, 16); with factor 4: 128 -> (4, 32); 127 -> (1, 127)."""
    if factor > 0 and dim % factor == 0:
        m = factor
    else:
        limit = dim if factor <= 0 else factor
        m = 1
        for d in range(2, dim + 1):
            if dim % d:
                continue
            if d > limit:
                break
            m = d
            if d >= dim // d:  # past the square root: the pair is as balanced as it gets
                break
    return min(m, dim // m), max(m, dim // m)


class LoKr(Adapter):
    """y = base(x) + multiplier · op(dropout(x), s·(W1 ⊗ W2)), op the wrapped linear map or conv.

    shapes: {factor name: shape} to lay the factors out as a file has them, instead of by rank and options.
    """

    kind = "lokr"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *, rs: bool = False,
                 dropout: float = 0.0, multiplier: float = 1.0, name: str = "default",
                 dtype: torch.dtype | None = None, factor: int = -1, decompose_both: bool = False,
                 full_matrix: bool = False, tucker: bool = False,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        super().__init__(base, rank, alpha, rs, dropout, multiplier, name)
        self.factor, self.decompose_both, self.full_matrix = int(factor), bool(decompose_both), bool(full_matrix)
        if shapes is None:
            shapes = self.layout(tuple(self.weight.shape), self.rank, self.factor, self.decompose_both,
                                 self.full_matrix, tucker)
        self.tucker = "lokr_t2" in shapes
        kw = self.factory(dtype)
        for key, shape in shapes.items():
            setattr(self, key, nn.Parameter(torch.empty(shape, **kw)))
        self.reset()

    @staticmethod
    def layout(shape: tuple[int, ...], r: int, factor: int, decompose_both: bool, full_matrix: bool,
               tucker: bool) -> dict[str, tuple[int, ...]]:
        """{factor name: shape} for a weight of `shape`: LyCORIS's choice of which factors are full or low rank."""
        kernel = shape[2:]
        (a, b), (c, d) = factorization(shape[0], factor), factorization(shape[1], factor)
        if decompose_both and r < max(a, c) / 2 and not full_matrix:
            out = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        else:
            out = {"lokr_w1": (a, c)}
        if r >= max(b, d) / 2 or full_matrix:
            out["lokr_w2"] = (b, d, *kernel)
        elif tucker and any(k > 1 for k in kernel):
            out.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=(r, r, *kernel))
        else:
            out.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
        return out

    @property
    def low_rank(self) -> bool:
        """Whether some factor is a low-rank product (then s = alpha/r; else s = 1)."""
        return hasattr(self, "lokr_w1_a") or hasattr(self, "lokr_w2_a")

    @property
    def scale(self) -> float:
        return super().scale if self.low_rank else 1.0

    @torch.no_grad()
    def reset(self) -> None:
        """LyCORIS's start: W1 (or its factors) Kaiming-uniform; W2 = 0, or W2a (and the core) Kaiming and W2b = 0."""
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_t2"):
            if hasattr(self, name):
                nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        """W2 as (b, d[, kh, kw])."""
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2
        if self.tucker:
            return tucker_product(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        b, kernel = self.lokr_w2_a.shape[0], self.weight.shape[2:]
        return (self.lokr_w2_a @ self.lokr_w2_b).view(b, -1, *kernel)

    def update_weight(self) -> torch.Tensor:
        w1, w2 = self.w1(), self.w2()
        w1 = w1.view(*w1.shape, *[1] * (w2.ndim - 2))  # a conv's kernel taps come from W2 alone
        return self.scale * torch.kron(w1, w2.contiguous())

    def extra_repr(self) -> str:
        w1, w2 = self.w1(), self.w2()
        return (super().extra_repr() + f", W1 {tuple(w1.shape)} ⊗ W2 {tuple(w2.shape)}"
                + ("" if self.low_rank else " (both full, s = 1)") + (", tucker" if self.tucker else ""))


def wrap(module: nn.Module, rank: int, alpha: float | None = None, *, factor: int = -1, decompose_both: bool = False,
         full_matrix: bool = False, tucker: bool = False, init: str = "kaiming", **kwargs) -> LoKr:
    """The LoKr layer for `module`. factor: the size to split dimensions by (-1: as square as possible);
    decompose_both: W1 low rank too; full_matrix: W1 and W2 full whatever the rank; tucker: a core for kxk convs."""
    if init != "kaiming":
        raise ValueError(f"LoKr has its own init (LyCORIS's); init={init!r} is for LoRA")
    return LoKr(module, rank, alpha, factor=factor, decompose_both=decompose_both, full_matrix=full_matrix,
                tucker=tucker, **kwargs)

"""LoHa (Hyeon-Woo et al. 2022, FedPara): the update is the Hadamard product of two rank-r products,

    ΔW = s · (W1a·W1b) ⊙ (W2a·W2b),

whose rank can reach r² for 2r(d+k) parameters. Names and shapes are LyCORIS's: hada_w1_a, hada_w2_a (out, r) and
hada_w1_b, hada_w2_b (r, in·kh·kw). With tucker=True a kxk conv keeps its kernel in two cores hada_t1, hada_t2
(r, r, kh, kw) and each half is a Tucker product, (W1a, W1b ∈ (r, out), (r, in)):
ΔW_1[o,i,h,w] = Σ t1[p,q,h,w]·W1a[p,o]·W1b[q,i].
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, tucker


class LoHa(Adapter):
    """y = base(x) + multiplier · op(dropout(x), s·(W1a·W1b) ⊙ (W2a·W2b)), op the wrapped linear map or conv."""

    kind = "loha"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *, rs: bool = False,
                 dropout: float = 0.0, multiplier: float = 1.0, name: str = "default",
                 dtype: torch.dtype | None = None, tucker: bool = False) -> None:
        super().__init__(base, rank, alpha, rs, dropout, multiplier, name)
        w = self.weight
        out, r = w.shape[0], self.rank
        kw = self.factory(dtype)
        kernel = tuple(w.shape[2:])
        self.tucker = bool(tucker) and any(k > 1 for k in kernel)
        if self.tucker:
            self.hada_w1_a = nn.Parameter(torch.empty(r, out, **kw))
            self.hada_w1_b = nn.Parameter(torch.empty(r, w.shape[1], **kw))
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *kernel, **kw))
            self.hada_w2_a = nn.Parameter(torch.empty(r, out, **kw))
            self.hada_w2_b = nn.Parameter(torch.empty(r, w.shape[1], **kw))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *kernel, **kw))
        else:
            self.hada_w1_a = nn.Parameter(torch.empty(out, r, **kw))
            self.hada_w1_b = nn.Parameter(torch.empty(r, w[0].numel(), **kw))
            self.hada_w2_a = nn.Parameter(torch.empty(out, r, **kw))
            self.hada_w2_b = nn.Parameter(torch.empty(r, w[0].numel(), **kw))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """LyCORIS's start: W1b, W2b ~ N(0, 1), W1a ~ N(0, 0.1²), cores ~ N(0, 0.1²), and W2a = 0, so ΔW = 0."""
        for p in (self.hada_w1_b, self.hada_w2_b):
            nn.init.normal_(p, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.zeros_(self.hada_w2_a)
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)

    def update_weight(self) -> torch.Tensor:
        if self.tucker:
            w1 = tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            w1 = self.hada_w1_a @ self.hada_w1_b
            w2 = self.hada_w2_a @ self.hada_w2_b
        return self.scale * (w1 * w2).view(self.weight.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", tucker" if self.tucker else "")


def wrap(module: nn.Module, rank: int, alpha: float | None = None, *, tucker: bool = False, init: str = "kaiming",
         **kwargs) -> LoHa:
    """The LoHa layer for `module`. tucker: kxk convs keep their kernel in cores hada_t1, hada_t2."""
    if init != "kaiming":
        raise ValueError(f"LoHa has its own init (LyCORIS's); init={init!r} is for LoRA")
    return LoHa(module, rank, alpha, tucker=tucker, **kwargs)

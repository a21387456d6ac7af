"""New tokens for textual inversion: rows appended to a text encoder's token embedding, the rest of the table frozen.

A new token `<tok>` with N vectors gets N ids past the vocabulary (49408, 49409, ...): the tokenizer turns the string
into those ids (CLIPTokenizer.add_token), and each tower's token embedding becomes a `TokenEmbedding`, which reads
ids below the vocabulary size from the original table and the others from a small trainable matrix `new_vectors`:

    e(id) = weight[id]                     id <  V     (the file's table, frozen: no gradient, never changed)
    e(id) = new_vectors[id - V]            id >= V     (N rows per new token, the only thing textual inversion trains)

So the original rows stay bit for bit what the checkpoint holds, and their gradient is not even computed. SDXL has
two towers: each gets its own rows (768 and 1280 wide), for the same ids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import CLIPTokenizer


class TokenEmbedding(nn.Module):
    """nn.Embedding's lookup over a frozen table `weight` [V, D] plus trainable rows `new_vectors` [n, D] (ids V..V+n-1).

    `weight` is the original Parameter (same object, same key `token_embedding.weight`); `new_vectors` is kept in
    float32, whatever the table's dtype, and cast to it at lookup, as the adapters' parameters are."""

    def __init__(self, table: nn.Embedding | TokenEmbedding, rows: torch.Tensor) -> None:
        super().__init__()
        self.weight = table.weight
        old = table.new_vectors.detach() if isinstance(table, TokenEmbedding) else rows.new_zeros(0, rows.shape[1])
        self.new_vectors = nn.Parameter(torch.cat([old.float(), rows.detach().float().to(old.device)]))

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def num_embeddings(self) -> int:
        """Ids this lookup takes: the table's rows, then the new ones."""
        return self.weight.shape[0] + self.new_vectors.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.vocab_size
        out = F.embedding(ids.clamp(max=self.vocab_size - 1), self.weight)
        if not bool(is_new.any()):
            return out
        new = F.embedding((ids - self.vocab_size).clamp(min=0), self.new_vectors).to(out.dtype)
        return torch.where(is_new[..., None], new, out)


def towers(encoder: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The token-embedding tables of a text encoder by the name embedding files use for them, each as (the module
    holding it, its attribute name): SD1 {"clip_l"}, SD2 {"clip_h"}, SDXL {"clip_l", "clip_g"} (ComfyUI's names)."""
    from .clip_l import ClipLTextEncoder
    from .open_clip import OpenClipTextEncoder
    from .sdxl import SDXLTextEncoder

    if isinstance(encoder, SDXLTextEncoder):
        return {"clip_l": (encoder.embedders[0].transformer.text_model.embeddings, "token_embedding"),
                "clip_g": (encoder.embedders[1].model, "token_embedding")}
    if isinstance(encoder, ClipLTextEncoder):
        return {"clip_l": (encoder.transformer.text_model.embeddings, "token_embedding")}
    if isinstance(encoder, OpenClipTextEncoder):
        return {"clip_h": (encoder.model, "token_embedding")}
    raise ValueError(f"new tokens: no token embedding known for a {type(encoder).__name__}")


def tables(encoder: nn.Module) -> dict[str, nn.Module]:
    """Each tower's token embedding (nn.Embedding, or TokenEmbedding once tokens were added)."""
    return {name: getattr(holder, attr) for name, (holder, attr) in towers(encoder).items()}


def widths(encoder: nn.Module) -> dict[str, int]:
    """The width of each tower's embedding: what an embedding file's vectors must have."""
    return {name: table.weight.shape[1] for name, table in tables(encoder).items()}


def vocab_size(table: nn.Module) -> int:
    """Ids a token embedding takes (its table plus added rows): what the encoders check token ids against."""
    return table.num_embeddings


def new_vectors(encoder: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable rows of every tower, {} when no token was added."""
    return {name: table.new_vectors for name, table in tables(encoder).items() if isinstance(table, TokenEmbedding)}


def check_token(tokenizer: CLIPTokenizer, token: str) -> None:
    """A new token must be a string the vocabulary does not already hold as one token, without spaces."""
    if not isinstance(token, str) or not token or token != token.strip() or any(c.isspace() for c in token):
        raise ValueError(f"token {token!r}: a new token is one word without spaces, e.g. '<my-token>'")
    if token.lower() in {t.lower() for t in tokenizer.added_tokens}:
        raise ValueError(f"token {token!r} was already added (ids {tokenizer.added_tokens[token]})")
    ids = tokenizer.encode(token)
    if len(ids) == 1:
        raise ValueError(f"token {token!r} is already in the vocabulary (id {ids[0]}, "
                         f"{tokenizer.id_to_token[ids[0]]!r}): its own embedding would be shadowed; choose a string "
                         f"the tokenizer splits into several pieces, e.g. '<{token}>'")


def init_word_id(tokenizer: CLIPTokenizer, word: str) -> int:
    """The single token id of an init word; a word that is several tokens is refused (which one would it be?)."""
    ids = tokenizer.encode(word)
    if len(ids) != 1:
        pieces = [tokenizer.id_to_token.get(i, i) for i in ids]
        raise ValueError(f"init_word {word!r} tokenizes to {len(ids)} tokens {pieces}, not one: choose a word that is "
                         f"a single token (e.g. 'dog', 'colour', 'toy'), or leave it empty for a random init")
    return ids[0]


def initial_vectors(encoder: nn.Module, tokenizer: CLIPTokenizer, num_vectors: int, init_word: str = "",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Starting rows [num_vectors, D] per tower: copies of the init word's embedding, or (no word) random rows with
    the table's own per-element standard deviation, drawn from `seed`."""
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
    out = {}
    word = init_word_id(tokenizer, init_word) if init_word else None
    for name, table in tables(encoder).items():
        weight = table.weight.detach().float()
        if word is not None:
            out[name] = weight[word].cpu().expand(num_vectors, -1).clone()
        else:
            g = torch.Generator().manual_seed(seed)
            out[name] = torch.randn(num_vectors, weight.shape[1], generator=g) * weight.std().cpu()
    return out


def add_token(encoder: nn.Module, tokenizer: CLIPTokenizer, token: str, vectors: dict[str, torch.Tensor]) -> list[int]:
    """Add `token` with its vectors {tower: [N, D]} to the tokenizer and every tower; returns its ids. The vectors
    become (part of) each tower's `new_vectors`, on the table's device; every other parameter is left as it was."""
    check_token(tokenizer, token)
    have = widths(encoder)
    if set(vectors) != set(have):
        raise ValueError(f"token {token!r}: vectors for {sorted(vectors)}, but this text encoder has {sorted(have)}")
    counts = {name: v.shape[0] for name, v in vectors.items()}
    for name, v in vectors.items():
        if v.ndim != 2 or v.shape[1] != have[name]:
            raise ValueError(f"token {token!r}: {name} vectors of shape {tuple(v.shape)} do not fit this model, whose "
                             f"{name} embedding is {have[name]} wide")
    if len(set(counts.values())) != 1:
        raise ValueError(f"token {token!r}: the towers get different numbers of vectors {counts}")
    for name, (holder, attr) in towers(encoder).items():
        table = getattr(holder, attr)
        if table.num_embeddings != tokenizer.vocab_size:  # the tokenizer and the model must hand out the same ids
            raise ValueError(f"token {token!r}: the tokenizer has {tokenizer.vocab_size} ids but the {name} embedding "
                             f"{table.num_embeddings}; add tokens to both through add_token")
        setattr(holder, attr, TokenEmbedding(table, vectors[name].to(table.weight.device)))
    return tokenizer.add_token(token, next(iter(counts.values())))

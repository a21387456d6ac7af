"""Textual-inversion embedding files in the layouts A1111 and ComfyUI read: write ours, read theirs.

    SD1 / SD2 .safetensors    {"emb_params": [N, D]}                      D = 768 (CLIP-L) or 1024 (OpenCLIP ViT-H)
    SDXL .safetensors         {"clip_l": [N, 768], "clip_g": [N, 1280]}   one row set per tower, same N
    A1111 .pt                 {"string_to_param": {"*": [N, D]}, "name": ..., "step": ..., ...}
    diffusers learned_embeds  {"<token>": [D]} or [N, D]                   one key: the token string

N is the number of vectors the token stands for. A1111 and ComfyUI name the token after the file (`name.safetensors`
is typed `name`, or `embedding:name` in ComfyUI); ours also carry it in the metadata ("name"). .pt/.bin files are read
with torch.load(weights_only=True): a pickle that needs code to load is refused, never run.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from atomic import atomic_path

from . import new_tokens
from .tokenizer import CLIPTokenizer

SINGLE_KEY = "emb_params"  # SD1/SD2: the one table's rows
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass
class Embedding:
    """The vectors of one token, by tower name (SD1/SD2 files have one table: key "emb_params"), and its name."""

    vectors: dict[str, torch.Tensor]
    name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def save(path: str | os.PathLike, token: str, vectors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write an embedding atomically: `vectors` by tower ({"clip_l"} for SD1, {"clip_h"} for SD2, both SDXL towers),
    stored as "emb_params" for one tower and as "clip_l" + "clip_g" for SDXL, in float32; the token in "name"."""
    path = Path(path)
    if set(vectors) == set(SDXL_KEYS):
        tensors = {k: vectors[k] for k in SDXL_KEYS}
    elif len(vectors) == 1:
        tensors = {SINGLE_KEY: next(iter(vectors.values()))}
    else:
        raise ValueError(f"embedding: vectors for {sorted(vectors)}: expected one tower, or SDXL's {SDXL_KEYS}")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(name=token, num_vectors=str(next(iter(tensors.values())).shape[0]))
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def _as_rows(value, path: Path, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or not value.is_floating_point():
        raise ValueError(f"{path}: {key!r} is not a [vectors, width] float tensor (got "
                         f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__})")
    return value.detach().float().reshape(-1, value.shape[-1])


def read(path: str | os.PathLike) -> Embedding:
    """The vectors and name of an embedding file in any of the layouts above, with one ValueError naming the file
    and what did not fit."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such embedding file")
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                data = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable .safetensors file ({err})") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: refused: this pickle needs code to load ({first[:160]}); only plain tensors "
                             f"and containers are read (torch.load weights_only=True). Convert it to .safetensors "
                             f"where you trust it") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise ValueError(f"{path}: not a readable torch file ({str(err).splitlines()[0][:160]})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    name = metadata.get("name") or None
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"{path}: string_to_param should hold one tensor, got "
                             f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        vectors = {SINGLE_KEY: _as_rows(next(iter(params.values())), path, "string_to_param")}
    elif all(k in data for k in SDXL_KEYS):
        vectors = {k: _as_rows(data[k], path, k) for k in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise ValueError(f"{path}: clip_l has {vectors['clip_l'].shape[0]} vectors, clip_g "
                             f"{vectors['clip_g'].shape[0]}: the towers must have as many")
    elif SINGLE_KEY in data:
        vectors = {SINGLE_KEY: _as_rows(data[SINGLE_KEY], path, SINGLE_KEY)}
    elif len(data) == 1:  # diffusers' learned_embeds: {token: vector}; ComfyUI's "clip_l"/"clip_h" single tables
        (key, value), = data.items()
        vectors = {SINGLE_KEY: _as_rows(value, path, key)}
        if key not in ("clip_l", "clip_h", "clip_g"):
            name = name or key
    else:
        raise ValueError(f"{path}: no embedding layout recognised (keys {sorted(data)[:8]}); expected emb_params, "
                         f"clip_l + clip_g, string_to_param, or one tensor")
    return Embedding(vectors, name, metadata)


def vectors_for(embedding: Embedding, encoder: torch.nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's vectors matched to this text encoder's towers, with one error naming the file when a width does not
    fit (an embedding made for another model family) or a tower is missing."""
    have = new_tokens.widths(encoder)
    got = embedding.vectors
    if SINGLE_KEY in got:
        if len(have) != 1:
            raise ValueError(f"{path}: one table ({SINGLE_KEY}, {got[SINGLE_KEY].shape[1]} wide), but this model "
                             f"has {len(have)} text towers {sorted(have)}: an SDXL embedding holds clip_l and clip_g")
        got = {next(iter(have)): got[SINGLE_KEY]}
    elif len(have) == 1 and next(iter(have)) in got:  # an SDXL file's CLIP-L rows on SD1, as ComfyUI reads it
        got = {k: v for k, v in got.items() if k in have}
    if set(got) != set(have):
        raise ValueError(f"{path}: vectors for {sorted(got)}, but this model's text encoder has {sorted(have)}")
    for tower, rows in got.items():
        if rows.shape[1] != have[tower]:
            shown = SINGLE_KEY if SINGLE_KEY in embedding.vectors else tower
            raise ValueError(f"{path}: {shown} is {rows.shape[1]} wide, but this model's {tower} embedding is "
                             f"{have[tower]} wide: the embedding was made for another model family")
    return got


def token_for(path: str | os.PathLike, embedding: Embedding, token: str | None = None) -> str:
    """The token a loaded embedding answers to: the one asked for, else the name in the file, else the file's stem
    (what A1111 types)."""
    return token or embedding.name or Path(path).stem


def load(path: str | os.PathLike, encoder: torch.nn.Module, tokenizer: CLIPTokenizer, token: str | None = None) -> str:
    """Read an embedding file and add its token to the text encoder and tokenizer; returns the token."""
    embedding = read(path)
    vectors = vectors_for(embedding, encoder, path)
    token = token_for(path, embedding, token)
    try:
        new_tokens.add_token(encoder, tokenizer, token, vectors)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return token

"""Weights for the benchmark: one part of a checkpoint read with plain file reads, in our layout or in diffusers'.

Both sides of the benchmark get their weights from here, so their loading differs only in what each model
does with the tensors (ours: built on meta and filled in the target dtype; the reference: as diffusers builds it).

Why plain reads and not safetensors' safe_open: safe_open memory-maps the file, and every page a read touches stays
mapped (and counted in the process's resident set) until the file is closed, so loading a 2 GB UNet through it
shows up as +2 GB of peak RSS on top of the weights themselves.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def header(path: str | Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data section, {key: {"dtype", "shape", "data_offsets"}}) of a .safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(n))
    entries.pop("__metadata__", None)
    return 8 + n, entries


def shapes(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Meta tensors (shape and file dtype) of the keys under `prefix`, prefix stripped."""
    _, entries = header(path)
    return {k[len(prefix):]: torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]], device="meta")
            for k, e in entries.items() if k.startswith(prefix)}


def read(path: str | Path, prefix: str, dtype: torch.dtype | None = None,
         device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(key without prefix, tensor) for the keys under `prefix`, each read with one file read and then cast to
    `dtype` (floating tensors only) on `device`: only one tensor in the file's dtype exists at a time."""
    start, entries = header(path)
    with open(path, "rb", buffering=0) as f:
        for key, e in entries.items():
            if not key.startswith(prefix):
                continue
            begin, end = e["data_offsets"]
            buf = bytearray(end - begin)
            f.seek(start + begin)
            f.readinto(buf)
            t = torch.frombuffer(buf, dtype=_DTYPES[e["dtype"]]).reshape(e["shape"]) if buf else \
                torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]])
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield key[len(prefix):], t.to(device)


def diffusers_key_map(ldm_shapes: dict[str, torch.Tensor], convert, config: dict, prefix: str) -> dict[str, str]:
    """{diffusers key: ldm key} from running diffusers' converter on meta tensors: each converted value is one of
    the inputs or a view of one (a 1x1 conv reshaped to a linear weight), so identity leads back to its source."""
    by_id = {id(v): k for k, v in ldm_shapes.items()}
    converted = convert({prefix + k: v for k, v in ldm_shapes.items()}, config)
    out = {}
    for dkey, v in converted.items():
        source = v if id(v) in by_id else v._base
        if source is None or id(source) not in by_id:
            raise ValueError(f"cannot trace diffusers key {dkey!r} back to a checkpoint tensor")
        out[dkey] = by_id[id(source)]
    return out

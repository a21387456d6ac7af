"""New LoRA files by truncated SVD: extract one from a full fine-tune (W_tuned − W_base) or from any adapter's file
(DoRA, LoHa, LoKr, Tucker LoRA: its dense ΔW, computed by lora/), or cut a LoRA (or LoHa/LoKr) file to a lower rank.

The best rank-r approximation of ΔW in Frobenius norm keeps its top-r singular triplets (Eckart–Young), so
B = U_r·sqrt(S_r), A = sqrt(S_r)·V_r^T and alpha = r (scale 1); the fraction of ||ΔW||_F² kept is
sum(s_1..s_r²) / sum(s²). The files are ordinary kohya (or diffusers) LoRA files that lora.load and other tools read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lora.io import base_model_version, num_res_blocks
from lora.names import kohya_name
from sd import write_state_dict

from . import plots
from . import spectral as sp
from .analyses import delta_svds
from .deltas import TE, Base, Delta, block_of, kind_of, load_base, load_run, read_lora_file
from .results import Result

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def write_lora(path: str | os.PathLike, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float, str]],
               metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write {module key: (down, up, alpha, format)} as a LoRA .safetensors, atomically.

    kohya keys: '<key>.lora_down.weight', '.lora_up.weight', '.alpha'. diffusers keys: '<key>.lora_A.weight',
    '.lora_B.weight', with alpha/r folded into B (diffusers readers assume alpha = r).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {path}")
    tensors: dict[str, torch.Tensor] = {}
    for key, (down, up, alpha, fmt) in modules.items():
        r = down.shape[0]
        if fmt == "kohya":
            tensors[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        elif fmt == "diffusers":
            tensors[f"{key}.lora_A.weight"] = down.to(dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = (up.double() * (alpha / r)).to(dtype).contiguous()
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}")
    return write_state_dict(path, tensors, {"format": "pt", **(metadata or {})})


def _factor_shapes(d: Delta, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes of a rank-r LoRA for a weight of d.shape: conv kernels keep their taps in A, B is 1x1."""
    if len(d.shape) == 4:
        return (r, *d.shape[1:]), (d.shape[0], r, 1, 1)
    return (r, d.shape[1]), (d.shape[0], r)


def _choose_rank(s: torch.Tensor, rank: int, energy: float | None) -> int:
    nonzero = int((s > 0).sum())
    r = min(rank, max(1, nonzero))
    if energy is not None:
        r = min(r, max(1, int(sp.energy_rank(s, energy))))
    return r


def _kept(s: torch.Tensor, r: int) -> float:
    total = float((s.double() ** 2).sum())
    return float((s[:r].double() ** 2).sum()) / total if total > 0 else 1.0


def _summary(rows: list[dict], energies: list[float]) -> dict[str, Any]:
    """Totals over layers: energy kept weighted by each layer's ||ΔW||², and the rank distribution."""
    total = sum(energies)
    kept = sum(r["kept_energy"] * e for r, e in zip(rows, energies)) / total if total > 0 else 1.0
    ranks = [r["r"] for r in rows]
    return {"layers": len(rows), "kept_energy": kept, "rel_error": math.sqrt(max(0.0, 1 - kept)),
            "min_kept_layer": min(r["kept_energy"] for r in rows), "rank_min": min(ranks), "rank_max": max(ranks),
            "params": sum(r["params"] for r in rows)}


def _figures(name: str, rows: list[dict]) -> dict:
    blocks = list(dict.fromkeys(r["block"] for r in rows))

    def per_block(path):
        kept = []
        for b in blocks:
            these = [r for r in rows if r["block"] == b]
            e = sum(r["fro_dW"] ** 2 for r in these)
            kept.append(sum(r["kept_energy"] * r["fro_dW"] ** 2 for r in these) / e if e > 0 else 1.0)
        plots.grouped_bars(path, blocks, {"energy kept": kept}, "fraction of ||ΔW||_F² kept",
                           f"{name}: energy kept per block")

    return {
        f"{name}_energy.png": lambda p: plots.per_layer_points(
            p, {"energy kept": {r["layer"]: r["kept_energy"] for r in rows}}, "fraction of ||ΔW||_F² kept",
            f"{name}: energy kept per layer"),
        f"{name}_blocks.png": per_block,
    }


def extract(tuned: str | os.PathLike, base: str | os.PathLike | Base, rank: int, out: str | os.PathLike, *,
            conv_rank: int | None = None, energy: float | None = None, targets: str | Sequence[str] | None = None,
            dtype: torch.dtype = torch.float16, progress: bool = True) -> Result:
    """A rank-`rank` LoRA from a full fine-tune or an adapter file, written to `out` (kohya format), per layer the
    best rank-r approximation of ΔW; returns what it kept per layer.

    tuned: a full checkpoint (ΔW = W_tuned − W_base), or a LoRA/DoRA/LoHa/LoKr file (ΔW by the adapter's formula on
    the base; for DoRA the merged weight minus W0, magnitude included).

    conv_rank: the rank for convs with kernels larger than 1x1 (default: rank). energy: a fraction such as 0.9
    to give each layer only the rank that holds that much of its ||ΔW||² (at most rank). targets: only
    these layers (a preset like 'attn-mlp', or patterns); layers the fine-tune did not change are left out.
    """
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"rank and conv_rank must be >= 1, got {rank}, {conv_rank}")
    base = base if isinstance(base, Base) else load_base(base)
    run = load_run(tuned, base, targets=targets, progress=progress)
    deltas = list(run.deltas.values())
    top = max(rank, conv_rank or 0)
    svds = delta_svds(deltas, top=top, desc="extract: SVD", progress=progress)
    nrb = num_res_blocks(base.model.unet)
    modules, rows, energies = {}, [], []
    for d, (u, s, vh) in zip(deltas, svds):
        big_kernel = len(d.shape) == 4 and math.prod(d.shape[2:]) > 1
        r = _choose_rank(s, conv_rank if big_kernel and conv_rank else rank, energy)
        up, down = sp.truncate(u, s, vh, r)
        down_shape, up_shape = _factor_shapes(d, r)
        te = d.name.startswith(TE)
        key = kohya_name(d.name.removeprefix(TE), "te" if te else "unet", None if te else nrb)
        modules[key] = (down.reshape(down_shape), up.reshape(up_shape), float(r), "kohya")
        fro = float(s.norm())
        rows.append({"layer": d.name, "block": block_of(d.name), "kind": kind_of(d.name),
                     "shape": "x".join(map(str, d.shape)), "r": r, "kept_energy": _kept(s, r),
                     "rel_error": math.sqrt(max(0.0, 1 - _kept(s, r))), "fro_dW": fro,
                     "params": r * (d.matrix_shape[0] + d.matrix_shape[1])})
        energies.append(fro ** 2)
    total = _summary(rows, energies)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "ss_base_model_version": base_model_version(base.model, {"unet": base.model.unet}),
                "lora_scaling": "alpha/r", "lora_extracted_from": Path(tuned).name,
                "lora_extracted_base": Path(base.path).name, "lora_extract_energy_kept": f"{total['kept_energy']:.6f}"}
    if conv_rank:
        metadata["ss_network_args"] = f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_rank}"}}'
    path = write_lora(out, modules, metadata, dtype)
    total.update(file=str(path), MB=path.stat().st_size / 2**20, skipped_unchanged=len(run.skipped))
    notes = [f"wrote {path}: {len(rows)} layers, {total['kept_energy']:.2%} of ||ΔW||_F² kept "
             f"(relative Frobenius error {total['rel_error']:.3f})"]
    return Result("extract", rows, [total], {"file": str(path)}, _figures("extract", rows), notes)


def _file_dtype(path: str) -> torch.dtype:
    if not path.endswith(".safetensors"):
        return torch.float16
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if key.endswith("weight"):
                code = f.get_slice(key).get_dtype()
                return {"F32": torch.float32, "BF16": torch.bfloat16}.get(code, torch.float16)
    return torch.float16


def resize(lora_file: str | os.PathLike, rank: int, out: str | os.PathLike, *, energy: float | None = None,
           dtype: torch.dtype | None = None, base: str | os.PathLike | Base | None = None,
           progress: bool = True) -> Result:
    """The same update as a LoRA at rank <= `rank` (per layer: the best approximation of ΔW), written to `out`.

    lora_file: a LoRA, Tucker LoRA, LoHa or LoKr file (ΔW by the adapter's own formula; a LoHa/LoKr kxk conv
    without a core keeps its kernel flat in the file, so its shape is known only from a base). base: read the file
    on this base checkpoint, as extract() does (needed for DoRA, and for LoHa/LoKr on kxk convs; the new file is
    kohya-named). Without a base, keeps the file's module names and layout; alpha becomes the new rank (scale 1). energy: a fraction
    such as 0.95 to cut each layer further, to the rank that holds that much of its ||ΔW||².
    dtype: of the new factors (default: the input file's).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    lora_file = str(lora_file)
    if base is not None:
        return extract(lora_file, base, rank, out, energy=energy, dtype=dtype or _file_dtype(lora_file),
                       progress=progress)
    deltas_by_name, metadata = read_lora_file(lora_file)
    deltas = list(deltas_by_name.values())
    svds = delta_svds(deltas, desc="resize: SVD", progress=progress)
    modules, rows, energies = {}, [], []
    for d, (u, s, vh) in zip(deltas, svds):
        r = _choose_rank(s, rank, energy)
        up, down = sp.truncate(u, s, vh, r)
        down_shape, up_shape = _factor_shapes(d, r)
        modules[d.file_key] = (down.reshape(down_shape), up.reshape(up_shape), float(r), d.file_format)
        fro = float(s.norm())
        rows.append({"layer": d.name, "block": block_of(d.name), "kind": kind_of(d.name),
                     "shape": "x".join(map(str, d.shape)), "r_before": d.rank, "r": r, "kept_energy": _kept(s, r),
                     "rel_error": math.sqrt(max(0.0, 1 - _kept(s, r))), "fro_dW": fro,
                     "params": r * (d.matrix_shape[0] + d.matrix_shape[1])})
        energies.append(fro ** 2)
    total = _summary(rows, energies)
    meta = {k: v for k, v in metadata.items() if k not in ("lora_adapter_metadata", "format")}
    if meta.get("ss_network_module", "networks.lora") != "networks.lora":  # e.g. lycoris.kohya: now a plain LoRA
        meta["ss_network_module"] = "networks.lora"
    meta.update({"ss_network_dim": str(rank), "ss_network_alpha": str(rank), "lora_scaling": "alpha/r",
                 "lora_resized_from": Path(lora_file).name, "lora_resize_energy_kept": f"{total['kept_energy']:.6f}"})
    if "ss_network_args" in meta:
        meta.pop("ss_network_args")  # its conv_dim / conv_alpha described the old ranks
    path = write_lora(out, modules, meta, dtype or _file_dtype(lora_file))
    before = Path(lora_file).stat().st_size / 2**20
    total.update(file=str(path), MB_before=before, MB=path.stat().st_size / 2**20)
    notes = [f"wrote {path}: {len(rows)} layers at rank <= {rank}, {total['kept_energy']:.2%} of ||ΔW||_F² kept "
             f"(relative Frobenius error {total['rel_error']:.3f})"]
    if any(d.adapter in ("loha", "lokr") and len(d.shape) == 2 for d in deltas):
        notes.append("LoHa/LoKr files keep a kxk conv's kernel flat: if this one adapts such convs, resize with "
                     "--base so that their LoRA factors get the conv's shape")
    return Result("resize", rows, [total], {"file": str(path)}, _figures("resize", rows), notes)

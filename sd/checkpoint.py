"""Reading and writing original Stable Diffusion checkpoint files (.safetensors and .ckpt), safely and lazily."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atomic import atomic_path

# Keys that original LDM files carry but that are not part of any network we build:
# the DDPM buffers of LatentDiffusion (we recompute the schedule), its per-timestep logvar,
# the EMA copy kept by the trainer, and the CLIP position_ids buffer (a constant arange).
IGNORED_KEYS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod "
    "posterior_variance posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 logvar".split()
)
IGNORED_PREFIXES = ("model_ema.",)
IGNORED_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used. The message names the file and the offending keys."""


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def first(keys: Iterable[str], n: int = 8) -> str:
    """A short, readable listing of the first few keys of a collection."""
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


class _LightningCallbackStub:
    """Stands in for pytorch_lightning's ModelCheckpoint, which some original .ckpt files pickle
    alongside the weights. It is only ever instantiated with plain data, never run."""

    def __setstate__(self, state):  # pragma: no cover - trivial
        self.__dict__.update(state if isinstance(state, dict) else {})


# Globals that released SD .ckpt files contain besides tensors; anything else is refused.
_SAFE_EXTRA_GLOBALS = [
    (_LightningCallbackStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _torch_load(path: Path) -> Mapping:
    """torch.load with weights_only=True: a pickle that needs arbitrary code raises, it is never executed."""
    import numpy as np

    extra = list(_SAFE_EXTRA_GLOBALS)
    extra += [np.dtype, np.dtypes.Float64DType, np.dtypes.Int64DType]
    try:
        extra.append((np._core.multiarray.scalar, "numpy.core.multiarray.scalar"))
    except AttributeError:  # numpy < 2
        extra.append(np.core.multiarray.scalar)
    with torch.serialization.safe_globals(extra):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointFile:
    """An opened checkpoint: key -> shape/dtype known up front, tensor data read on demand.

    `shapes` maps every tensor key to a tensor on the meta device, so architecture inference and
    key/shape validation happen before a single weight is read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        if self.path.stat().st_size == 0:
            raise CheckpointError(f"{self.path}: the file is empty")
        self.metadata: dict[str, str] = {}
        self._safetensors = None
        self._tensors: Mapping[str, torch.Tensor] | None = None
        suffix = self.path.suffix.lower()
        if suffix == ".safetensors":
            self._open_safetensors()
        elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
            self._open_pickle()
        else:
            raise CheckpointError(f"{self.path}: unknown extension {suffix!r}; expected .safetensors or .ckpt")

    def _open_safetensors(self) -> None:
        try:
            self._safetensors = safe_open(self.path, framework="pt", device="cpu")
            self.metadata = dict(self._safetensors.metadata() or {})
            self.shapes = {}
            for k in self._safetensors.keys():
                sl = self._safetensors.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
                self.shapes[k] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt/truncated headers
            raise CheckpointError(f"{self.path}: not a readable safetensors file (truncated or corrupt?): {err}") from err

    def _open_pickle(self) -> None:
        if not zipfile.is_zipfile(self.path):
            raise CheckpointError(
                f"{self.path}: not a PyTorch checkpoint (not a zip archive; the file may be truncated, "
                "or a legacy pre-1.6 pickle, which is refused because it could run code)"
            )
        try:
            obj = _torch_load(self.path)
        except Exception as err:
            if "weights_only" in str(err) or "Unsupported global" in str(err) or "Unpickl" in type(err).__name__:
                raise CheckpointError(
                    f"{self.path}: refused: this pickle needs objects other than tensors to load, and loading it "
                    f"could execute arbitrary code. Convert it to .safetensors with a tool you trust. Details: {err}"
                ) from err
            raise CheckpointError(f"{self.path}: could not read the checkpoint (truncated or corrupt?): {err}") from err
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{self.path}: holds no state dict of tensors")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._tensors.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def read(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, converted straight to the target dtype (floating tensors only) and device."""
        t = self._safetensors.get_tensor(key) if self._safetensors is not None else self._tensors[key]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype=dtype)
        return t.to(device=device)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def write_state_dict(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict atomically (temp file in the same folder, then rename), as .safetensors or .ckpt by extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            save_file(tensors, tmp, metadata=dict(metadata or {}))
        else:
            torch.save({"state_dict": tensors}, tmp)
    return path

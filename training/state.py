"""Resumable training state: trainable weights, optimizer, GradScaler, EMA, RNG states and the step, written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from atomic import atomic_path, write_text

STATE_DIR = "state"


def rng_states() -> dict[str, Any]:
    """Torch's generators: dropout and init draw from them. Data order, noise and timesteps come from
    generators seeded by (seed, step), so they need no saved state."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(out: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, ema: dict[str, torch.Tensor] | None, config: dict,
               extra: dict | None = None) -> Path:
    """Write <out>/state/step_<N>.pt atomically and point <out>/state/latest at it."""
    folder = Path(out) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.pt"
    payload = {
        "step": step,
        "trainable": {k: v.detach().cpu() for k, v in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": {k: v.cpu() for k, v in ema.items()} if ema is not None else None,
        "rng": rng_states(),
        "config": config,
        **(extra or {}),
    }
    _atomic_torch_save(payload, path)
    (folder / "latest.tmp").write_text(path.name)
    os.replace(folder / "latest.tmp", folder / "latest")
    return path


def resolve(resume: str, out: Path) -> Path:
    """A state file from --resume: a path, or 'latest' for the newest state of this output folder."""
    if resume == "latest":
        pointer = Path(out) / STATE_DIR / "latest"
        if not pointer.is_file():
            raise ValueError(f"resume: no training state in {Path(out) / STATE_DIR} to resume from")
        return pointer.parent / pointer.read_text().strip()
    path = Path(resume)
    if path.is_dir() and (path / STATE_DIR / "latest").is_file():
        return resolve("latest", path)
    if not path.is_file():
        raise ValueError(f"resume: training state not found: {path}")
    return path


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(step, configuration) of a training state, without reading its tensors (memory-mapped): cheap enough to run
    before any model is loaded."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"]), dict(state.get("config") or {})
    except Exception as err:
        raise ValueError(f"resume: {path} is not a readable training state: {err}") from None


# Left behind by a kill during a save: atomic_path's temp files (.NAME.RANDOM.tmp), the `latest` pointer's temp file,
# and tempfile's default names (.tmpRANDOM). Never a finished output.
STALE_PATTERNS = (".*.tmp", "latest.tmp", ".tmp*")


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the temp files an interrupted save left in a run's folders (the run folder, state/, samples/)."""
    removed = []
    for folder in (Path(out), Path(out) / STATE_DIR, Path(out) / "samples"):
        if not folder.is_dir():
            continue
        for pattern in STALE_PATTERNS:
            for path in folder.glob(pattern):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def truncate_log(path: Path, step: int) -> int:
    """Drop the records of log.jsonl past `step` (written after the state a run resumes from, and about to be
    written again). Returns how many were dropped; a half-written last line goes too."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = int(record.get("step", 0)) <= step
        except (ValueError, TypeError, AttributeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"resume: {path} is not a readable training state: {err}") from err


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)

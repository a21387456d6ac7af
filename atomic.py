"""Atomic file writes: the data goes to a temp file beside the target, which is renamed over it only when complete.

Readers see the old file or the new one, never half of one, and an interrupted write leaves the old file as it was.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path in `path`'s folder to write to; on success rename it over `path`, on error delete it.

    mkstemp creates files readable by their owner only; the result gets the permissions a plain open() would
    give (0666 less the umask), so outputs can be shared like any other file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Path.write_text, atomically: a reader (or a crash) never sees half of the file."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)

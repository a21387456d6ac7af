"""Stopping a run without losing it: SIGINT, SIGTERM and SIGHUP become one KeyboardInterrupt, never in the middle of an
optimizer step or a save, and output that has nowhere to go (a closed pipe or terminal) is dropped instead of raised.

Why each piece:
- Ctrl-C sends SIGINT; a scheduler's time limit or `kill` sends SIGTERM; closing an SSH session sends SIGHUP. All three
  must leave a resumable state, so all three are handled alike.
- A signal that lands while AdamW is half-way through its parameters would save a state that no uninterrupted run ever
  had. Inside `critical()` the signal is held and raised when the block ends.
- `python train.py 2>&1 | tee log` then Ctrl-C: the shell's SIGINT also ends `tee`, so the next print or progress-bar
  refresh raises BrokenPipeError, which would end the run before its state is written. `quiet_on_broken_pipe` makes
  stdout and stderr drop what cannot be written.
"""
from __future__ import annotations

import io
import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A stop request: `signal_name` says which signal (SIGINT, SIGTERM, SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


class Interrupts:
    """Signal handling for a training run. `install()` once in the main thread; wrap steps and saves in `critical()`."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def install(self) -> None:
        for signum in SIGNALS:  # SIGINT too: started in the background, a process ignores it by default
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.depth:
            self.pending = self.pending or signum  # the block raises it when it ends
            return
        raise Interrupted(signum)

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A block that a signal does not cut in two: a signal that arrives inside it is raised when it ends."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


class _DropWhenBroken(io.TextIOBase):
    """A text stream that writes to `stream` until a write fails (EPIPE, EIO), then silently drops everything, and
    points the file descriptor at /dev/null so that the interpreter's own flush at exit stays quiet too."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except (OSError, ValueError):
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._break()

    def _break(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def isatty(self) -> bool:
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # tqdm and print ask for it
        return getattr(self.stream, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


def quiet_on_broken_pipe() -> None:
    """Make sys.stdout and sys.stderr drop output once their reader is gone, instead of raising."""
    if not isinstance(sys.stdout, _DropWhenBroken):
        sys.stdout = _DropWhenBroken(sys.stdout)
    if not isinstance(sys.stderr, _DropWhenBroken):
        sys.stderr = _DropWhenBroken(sys.stderr)


def say(*args, **kwargs) -> None:
    """print that never raises: a message must never stop a save."""
    try:
        print(*args, **kwargs)
    except (OSError, ValueError):
        pass

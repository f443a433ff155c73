"""Atomic file writes: the only way the library writes an output, so a crash or a signal never leaves a
half-written file where a finished one is expected, and collaborators can read what was written.

Why the explicit mode: `tempfile.mkstemp` creates files readable by their owner only (0600); renamed into place
they would hide results from everyone else on a shared cluster. The final file gets the mode an ordinary `open()`
would give it (0666 less the process umask).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from bsq.signals import critical

__all__ = ["atomic_write", "write_text_atomic", "default_file_mode"]


def default_file_mode() -> int:
    """0666 less the current umask: what `open(path, "w")` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = False, fsync: bool = False) -> Path:
    """Write through `write(handle)` to a temporary file beside `path`, then rename it over `path`.

    The temporary file is removed on any failure, KeyboardInterrupt and signals included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with critical():  # a stop signal waits until the file is whole (bsq.signals)
        return _write_and_rename(path, write, binary, fsync)


def _write_and_rename(path: Path, write: Callable[[IO[Any]], None], binary: bool, fsync: bool) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text))

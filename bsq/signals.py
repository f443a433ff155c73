"""Stop signals as exceptions, and the sections they must not cut in half.

SIGTERM and SIGHUP (what SLURM sends on `scancel` and at the time limit, and a closed terminal) become
`StageInterrupted`, so a job ends as on Ctrl-C: MLflow run KILLED, resume file kept, exit code 128 + signal.

Why `critical()`: an exception raised inside `torch.save` or inside an MLflow store write leaves the writer in a
broken state (torch's zip writer then fails with its own RuntimeError, masking the stop). A signal that arrives in
such a section is held and raised as soon as the section ends, when the file or the record is whole.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from bsq.errors import StageInterrupted

__all__ = ["STOP_SIGNALS", "stop_signals_raise", "critical"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_state = {"depth": 0, "pending": None}


def _on_stop(signum: int, frame: object) -> None:
    for sig in STOP_SIGNALS:  # a second signal must not interrupt the clean-up the first one starts
        signal.signal(sig, signal.SIG_IGN)
    if _state["depth"]:
        _state["pending"] = signum
        return
    raise StageInterrupted(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM / SIGHUP raise StageInterrupted; the previous handlers come back afterwards."""
    previous = {sig: signal.signal(sig, _on_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state["pending"] = None


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A section a stop signal must not interrupt; a signal received inside is raised when it ends."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if _state["depth"] == 0 and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        raise StageInterrupted(signum)

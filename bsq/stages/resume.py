"""The resume file of one stage job (`<folder>/.<stage>.resume.pt`): written after every epoch, read when the same
job starts again, removed when it finishes.

Only a file written for the same config (the config hash) is resumed. A file for another config or a corrupt one is
moved aside (never deleted) and the stage starts over; the MLflow run a stale file names is reported so that it can
be closed. Under DDP rank 0 decides (it holds the folder lock) and the other ranks read what it kept.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsq.checkpoint import load_checkpoint, save_checkpoint
from bsq.engine import Distributed
from bsq.errors import BSQError

log = logging.getLogger("bsq")
__all__ = ["ResumeFile", "ResumeState"]


@dataclass(frozen=True)
class ResumeState:
    """What `ResumeFile.read` found: the checkpoint to resume (None: start over) and the MLflow run of a stale
    file moved aside (None if none)."""

    checkpoint: dict[str, Any] | None
    stale_run_id: str | None = None


@dataclass(frozen=True)
class ResumeFile:
    path: Path
    config_hash: str
    dist: Distributed

    def read(self) -> ResumeState:
        """The resume file of an interrupted run of this same config, if any (rank 0 decides, see the module)."""
        if not self.dist.is_main:
            self.dist.barrier()
            return ResumeState(load_checkpoint(self.path) if self.path.exists() else None)
        state = self._check()
        self.dist.barrier()
        return state

    def _check(self) -> ResumeState:
        path = self.path
        if not path.exists():
            return ResumeState(None)
        try:
            ckpt = load_checkpoint(path)
        except BSQError as exc:
            aside = path.with_suffix(".corrupt")
            os.replace(path, aside)
            log.warning("resume file unreadable (%s); moved to %s, starting over", exc, aside)
            return ResumeState(None)
        if ckpt.get("config_hash") != self.config_hash:
            aside = path.with_name(f"{path.stem}.{ckpt.get('config_hash', 'unknown')}.stale.pt")
            os.replace(path, aside)
            log.warning("resume file is for another config; moved to %s, starting over", aside)
            return ResumeState(None, ckpt.get("run_id"))
        return ResumeState(ckpt)

    def save(self, payload: dict[str, Any]) -> None:
        """Write the resume payload (a checkpoint with trainer state); rank 0 only."""
        if self.dist.is_main:
            save_checkpoint(self.path, payload)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

"""One live process per output folder: the lock that keeps two jobs from training into the same files.

Why: after `kill -9` of Snakemake its orphaned job keeps training while `--rerun-incomplete` starts a second one in
the same folder; both then write one resume file and one MLflow run. A stage takes `<folder>/.bsq.lock` before it
reads its resume file or opens its MLflow run, and a second process refuses to start, naming the holder.

How: an exclusive `flock` on the lock file, which the kernel drops when the holder dies however it dies (kill -9
included), so a lock left by a dead process is never mistaken for a live one. The file also records who holds it
(pid, host, stage, start time) for the message, and the holder's MLflow run id: a process that takes over a lock
left behind by a dead holder learns which run was left RUNNING and can close it as KILLED.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bsq.errors import BSQError

__all__ = ["LOCK_NAME", "LockHolder", "FolderLock", "FolderBusy"]

LOCK_NAME = ".bsq.lock"


class FolderBusy(BSQError):
    """Another live process works in this output folder."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    stage: str
    started: str
    run_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        try:
            data = json.loads(text)
            return cls(
                int(data["pid"]), str(data["host"]), str(data["stage"]), str(data["started"]), data.get("run_id")
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (stage {self.stage}, since {self.started})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """Exclusive lock of one output folder for one stage process; `previous` is the record a dead holder left."""

    def __init__(self, folder: str | Path, stage: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.stage = stage
        self.previous: LockHolder | None = None
        self._handle: Any = None
        self._me = LockHolder(os.getpid(), socket.gethostname(), stage, time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> FolderLock:
        """Take the lock or raise FolderBusy naming the live holder. Retries when the file was replaced between
        open and flock (a holder releasing at that moment)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lifetime of the lock
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = LockHolder.parse(handle.read())
                handle.close()
                raise FolderBusy(self._busy_message(holder)) from None
            if self._same_file(handle):
                break
            handle.close()  # the holder unlinked it between our open and flock: take the new file
        else:
            raise FolderBusy(f"could not lock {self.path}: it keeps being replaced by another process")
        handle.seek(0)
        self.previous = LockHolder.parse(handle.read())
        self._handle = handle
        self._write(self._me)
        return self

    def _same_file(self, handle: Any) -> bool:
        try:
            return os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _busy_message(self, holder: LockHolder | None) -> str:
        who = holder.describe() if holder else "another process"
        here = socket.gethostname()
        hint = f"stop it (kill {holder.pid}) " if holder and holder.host == here and _pid_alive(holder.pid) else ""
        return (
            f"{self.path.parent} is in use by {who}: two processes must not train into one output folder. Wait for "
            f"it to finish or {hint}and run the command again; it resumes from the last completed epoch."
        )

    def record_run(self, run_id: str | None) -> None:
        """Remember this process's MLflow run, so a successor can close it if this process dies."""
        if self._handle is not None and run_id:
            self._me = LockHolder(**{**asdict(self._me), "run_id": run_id})
            self._write(self._me)

    def _write(self, holder: LockHolder) -> None:
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps(asdict(holder)) + "\n")
        self._handle.flush()

    def release(self) -> None:
        """Remove the record and drop the lock (the record is gone, so nobody closes a finished run)."""
        if self._handle is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if self._same_file(self._handle):
                self.path.unlink()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

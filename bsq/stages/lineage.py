"""Opening a stage job's run: claim the output folder, read the resume file, start (or reopen) the MLflow run with
its labels, tags and lineage, and close the runs dead processes left RUNNING there.

Labels say what a run is in tables and tags: a parent's labels are inherited, then the dataset, architecture,
method and seed, then the labels the stage passes (e.g. the search's alpha), then the stage config's `labels`, which
win (the workflow puts a point's labels there). Lineage is the parent's list of upstream runs plus this one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bsq.runlock import FolderLock
from bsq.stages.context import RunContext
from bsq.tracking import Tracker

log = logging.getLogger("bsq")
__all__ = ["Run", "RunScope", "open_run", "run_labels"]


@dataclass(frozen=True)
class Run:
    """The opened run of one job: its MLflow tracker, labels, lineage and the resume checkpoint it found."""

    tracker: Tracker
    labels: Mapping[str, Any]
    lineage: list[dict[str, Any]]
    resume: dict[str, Any] | None  # the resume file's checkpoint (None: a fresh start)


def run_labels(
    ctx: RunContext, parent: Mapping[str, Any] | None, method: str | None, labels: Mapping[str, Any]
) -> dict[str, Any]:
    """This run's labels (see the module). The method label is the config's `method` when set, else the stage's
    own (`method`: fracbits, uniform), else the parent's (prune, finetune and evaluate keep the label of what they
    continue), else bsq."""
    cfg = ctx.cfg
    inherited = (parent or {}).get("labels", {})
    return {
        **inherited,
        "dataset": cfg.data.name,
        "arch": cfg.model.arch,
        "method": cfg.method or method or inherited.get("method") or "bsq",
        "seed": cfg.seed,
        **{k: v for k, v in labels.items() if v is not None},
        **cfg.labels,
    }


def _tags(ctx: RunContext, labels: Mapping[str, Any], upstream: list[dict[str, Any]]) -> dict[str, str]:
    cfg = ctx.cfg
    tags = {
        "bsq.stage": ctx.stage,
        "bsq.method": str(labels["method"]),
        "bsq.dataset": cfg.data.name,
        "bsq.arch": cfg.model.arch,
        "bsq.seed": str(cfg.seed),
        "bsq.config_hash": ctx.config_hash,
        "bsq.preset": cfg.preset,
        **{f"bsq.{k}": str(v) for k, v in labels.items() if k not in ("dataset", "arch", "method", "seed")},
        **{f"bsq.{e['stage']}_run_id": e["run_id"] for e in upstream if e.get("run_id")},
        **{f"bsq.{k}": str(v) for k, v in ctx.volatile.items() if not k.startswith("tracking.")},
        **cfg.tracking.tags,
    }
    parent_run = upstream[-1].get("run_id") if upstream else None
    if parent_run:
        tags["bsq.upstream_run_id"] = parent_run
    return tags


def open_run(
    ctx: RunContext,
    parent: Mapping[str, Any] | None = None,
    *,
    method: str | None = None,
    labels: Mapping[str, Any] | None = None,
) -> RunScope:
    """Claim the output folder, then start (or, when resuming, reopen) this job's MLflow run. Use as
    `with open_run(ctx, parent) as run:`; leaving the block ends the run (FINISHED, FAILED or KILLED) and frees
    the folder."""
    lock = FolderLock(ctx.folder, ctx.stage)
    if ctx.dist.is_main:
        lock.acquire()
    try:
        run = _start(ctx, lock, parent, run_labels(ctx, parent, method, labels or {}))
    except BaseException:
        lock.release()
        raise
    return RunScope(run, lock)


def _start(ctx: RunContext, lock: FolderLock, parent: Mapping[str, Any] | None, labels: dict[str, Any]) -> Run:
    cfg = ctx.cfg
    upstream = list((parent or {}).get("lineage", []))
    stale = [lock.previous.run_id] if lock.previous is not None else []  # MLflow runs dead processes left RUNNING
    resume = ctx.resume_file.read()
    if resume.stale_run_id is not None:
        stale.append(resume.stale_run_id)
    name = ctx.stage + (f"/alpha={labels['alpha']}" if "alpha" in labels else "") + f"/seed={cfg.seed}"
    tracker = Tracker(
        cfg.tracking.experiment or f"bsq-repro-{cfg.data.name}-{cfg.model.arch}",
        name,
        uri=ctx.tracking_uri,
        tags=_tags(ctx, labels, upstream),
        params=ctx.params,
        parent_run_id=upstream[-1].get("run_id") if upstream else None,
        resume_run_id=resume.checkpoint.get("run_id") if resume.checkpoint else None,
        enabled=cfg.tracking.enabled and ctx.dist.is_main,
    )
    closed = tracker.close_stale(stale, f"its process died or was replaced; {ctx.folder} was taken over by a later run")
    if closed:
        log.warning("closed MLflow run(s) %s left RUNNING by a dead process as KILLED", ", ".join(closed))
    lock.record_run(tracker.run_id)
    lineage = upstream + [{"stage": ctx.stage, "run_id": tracker.run_id, "experiment_id": tracker.experiment_id}]
    return Run(tracker, labels, lineage, resume.checkpoint)


class RunScope:
    """The `with` block of one job: yields its `Run`; on leaving, ends the MLflow run and frees the folder."""

    def __init__(self, run: Run, lock: FolderLock) -> None:
        self.run, self.lock = run, lock

    def __enter__(self) -> Run:
        return self.run

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.run.tracker.__exit__(exc_type, exc, tb)
        finally:
            self.lock.release()
        return False

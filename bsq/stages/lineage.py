"""Opening a stage job's run: claim the output folder, read the resume file, start (or reopen) the MLflow run with
its name, labels, params, tags, description, dataset input and lineage, and close the runs dead processes left
RUNNING there.

Labels say what a run is in tables and tags: a parent's labels are inherited, then the dataset, architecture,
method and seed, then the labels the stage passes (e.g. the search's alpha), then the stage config's `labels`, which
win (the workflow puts a point's labels there). Lineage is the parent's list of upstream runs plus this one.

In MLflow, a run's name says what it is (`bsq α=3 · search · s1`, `bsq α=3 · scratch · s1`,
`fracbits @ bsq α=3 size · s1`, `uniform W4 · s1`, `eval · <the run it evaluates>`); its params are the settings its
stage reads (bsq.stages.context.stage_keys) plus method, point and seed; its parent is the workflow invocation's run
($BSQ_PARENT_RUN_ID, one level), and its lineage is in tags (`bsq.<stage>_run_id`, `bsq.upstream_run_id`) and in
the description, which links the upstream runs by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bsq.data import dataset_source
from bsq.methods import all_stages, method_of_stage
from bsq.runlock import FolderLock
from bsq.stages.context import RunContext
from bsq.tracking import Tracker, invocation_parent

log = logging.getLogger("bsq")
__all__ = ["Run", "RunScope", "open_run", "run_labels", "run_name", "run_point", "describe"]


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


# ---- what a run is called --------------------------------------------------------------------------------------
_UNITS = {"size": "MB", "bitops": "GBitOPs"}


def run_method(stage: str, labels: Mapping[str, Any]) -> str:
    """The method a run belongs to in MLflow: `float` for pretraining (whose labels default to bsq), else its label."""
    return "float" if stage == "pretrain" else str(labels.get("method") or "bsq")


def run_point(stage: str, labels: Mapping[str, Any]) -> str:
    """The point of a run in plain words (the `point` param): `alpha=3`, `bits=4`, `bsq alpha=3 compression` (FracBits
    at that BSQ run's cost), `target=0.08 size`; `float` for pretraining."""
    if stage == "pretrain":
        return "float"
    if "budget_of" in labels:
        alpha = f" alpha={labels['alpha']}" if "alpha" in labels else ""
        return f"{labels['budget_of']}{alpha} {labels.get('match', '')}".strip()
    for key in ("alpha", "bits"):
        if key in labels:
            return f"{key}={labels[key]}"
    if "target" in labels:
        return f"target={labels['target']} {labels.get('cost', '')}".strip()
    return "official" if labels.get("source") == "official" else ""


def describe(stage: str, labels: Mapping[str, Any]) -> str:
    """What a run is, in a few words: `bsq α=3`, `fracbits @ bsq α=3 size`, `fracbits 0.08 MB`, `uniform W4`,
    `float`."""
    method = run_method(stage, labels)
    if method == "float":
        return "float"
    if labels.get("source") == "official":
        return f"official {labels.get('arch', '')}".strip()
    if "budget_of" in labels:
        alpha = f" α={labels['alpha']}" if "alpha" in labels else ""
        return f"{method} @ {labels['budget_of']}{alpha} {labels.get('cost', '')}".strip()
    if "alpha" in labels:
        return f"{method} α={labels['alpha']}"
    if "bits" in labels:
        return f"{method} W{labels['bits']}"
    if "target" in labels:
        return f"{method} {labels['target']} {_UNITS.get(str(labels.get('cost')), '')}".strip()
    return method


def run_name(stage: str, labels: Mapping[str, Any], seed: Any, evaluates: Mapping[str, Any] | None = None) -> str:
    """The run's MLflow name: what it is, its stage (unless the method is that one stage), the seed; an evaluation
    is `eval · ` + the name of the run it evaluates (`evaluates`: that checkpoint's stage and labels)."""
    if stage == "evaluate":
        if evaluates is None:  # one of the authors' checkpoints
            return f"eval · {describe(stage, labels)} · s{seed}"
        return "eval · " + run_name(str(evaluates.get("stage")), evaluates.get("labels") or labels, seed)
    method = method_of_stage(stage)
    step = "scratch" if stage == "finetune" and labels.get("variant") == "scratch" else stage
    one_stage = method is not None and len(method.stages) == 1
    return " · ".join([describe(stage, labels), *([] if one_stage else [step]), f"s{seed}"])


def _params(ctx: RunContext, labels: Mapping[str, Any], parent: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings this stage reads, plus method, point and seed (of the evaluated run for an evaluation)."""
    of = parent if ctx.stage == "evaluate" and parent is not None else None
    stage, what = (str(of.get("stage")), of.get("labels") or labels) if of else (ctx.stage, labels)
    params = dict(ctx.stage_params)
    if not all_stages()[ctx.stage].recipe.get("epochs", 1):  # prune and evaluate train nothing: no optimiser
        params = {k: v for k, v in params.items() if not k.startswith("optim.")}
    return {"method": run_method(stage, what), "point": run_point(stage, what) or "none", **params}


def _describe_run(
    ctx: RunContext, name: str, method: str, upstream: list[dict[str, Any]], dataset: Mapping[str, Any]
) -> str:
    """The run page's description (markdown): what it is and the upstream runs, linked by name."""
    spec = all_stages()[ctx.stage]
    lines = [
        f"**{name}**: {spec.help or ctx.stage} (stage `{ctx.stage}`, method `{method}`, seed {ctx.cfg.seed}, "
        f"{ctx.cfg.data.name} / {ctx.cfg.model.arch}, preset `{ctx.cfg.preset}`, config hash `{ctx.config_hash}`).",
        "",
    ]
    if upstream:
        lines.append("Upstream runs (from the float model down):")
        for entry in upstream:
            run_id, exp = entry.get("run_id"), entry.get("experiment_id")
            label = entry.get("name") or entry.get("stage")
            link = f"[{label}](#/experiments/{exp}/runs/{run_id})" if run_id and exp else str(label)
            lines.append(f"- {entry.get('stage')}: {link} (`{run_id}`)")
        lines.append("")
    lines.append(f"Dataset: {dataset['name']} ({dataset['source']}, digest `{dataset['digest']}`).")
    lines.append(f"Outputs: `{ctx.folder}`.")
    return "\n".join(lines)


# ---- the dataset input -----------------------------------------------------------------------------------------
def dataset_input(ctx: RunContext) -> dict[str, Any]:
    """The run's dataset as MLflow records it: name, source URI, digest (of the data files and the subsets), the
    context (train for a training stage, test for prune and evaluate) and input tags."""
    data = ctx.cfg.data
    source, content = dataset_source(data)
    subsets = {"train_subset": data.train_subset, "test_subset": data.test_subset}
    digest = hashlib.sha256(json.dumps([content or source, subsets]).encode()).hexdigest()[:12]
    training = bool(all_stages()[ctx.stage].recipe.get("epochs", 1))
    tags = {k: str(v) for k, v in subsets.items() if v is not None}
    tags["splits"] = "train, test" if training else "test"
    return {
        "name": data.name,
        "source": source,
        "digest": digest,
        "context": "train" if training else "test",
        "tags": tags,
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
        **{f"bsq.{k}": str(v) for k, v in ctx.volatile.items() if not k.startswith("tracking.") and v is not None},
        **cfg.tracking.tags,
    }
    if upstream and upstream[-1].get("run_id"):
        tags["bsq.upstream_run_id"] = upstream[-1]["run_id"]
        if upstream[-1].get("name"):
            tags["bsq.upstream_run_name"] = upstream[-1]["name"]
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
    evaluates = {"stage": parent.get("stage"), "labels": parent.get("labels")} if parent is not None else None
    name = run_name(ctx.stage, labels, cfg.seed, evaluates)
    enabled = cfg.tracking.enabled and ctx.dist.is_main
    dataset = dataset_input(ctx) if enabled else {}
    resume_run_id = resume.checkpoint.get("run_id") if resume.checkpoint else None
    params = _params(ctx, labels, parent)
    tracker = Tracker(
        cfg.tracking.experiment or f"bsq-repro-{cfg.data.name}-{cfg.model.arch}",
        name,
        uri=ctx.tracking_uri,
        tags=_tags(ctx, labels, upstream),
        params=params,
        parent_run_id=invocation_parent(),  # the workflow invocation's run (none for a CLI job on its own)
        resume_run_id=resume_run_id,
        description=_describe_run(ctx, name, params["method"], upstream, dataset) if enabled else None,
        enabled=enabled,
    )
    if enabled:
        tracker.log_dataset(dataset["name"], dataset["source"], dataset["digest"], dataset["context"], dataset["tags"])
    closed = tracker.close_stale(stale, f"its process died or was replaced; {ctx.folder} was taken over by a later run")
    if closed:
        log.warning("closed MLflow run(s) %s left RUNNING by a dead process as KILLED", ", ".join(closed))
    lock.record_run(tracker.run_id)
    lineage = upstream + [
        {"stage": ctx.stage, "run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "name": name}
    ]
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

"""What every stage does around its algorithm: validate config and files before touching anything, pick the
device, build the data, open the MLflow run with its lineage, keep the resume file, and write the declared outputs
(checkpoint, metrics.json, history.csv, run.json) atomically.

Outputs are a `{name: path}` mapping (Snakemake passes its declared outputs); `default_outputs(stage, out_dir)` gives
the standard file names for the command line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from bsq.atomic import atomic_write, write_text_atomic
from bsq.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from bsq.config import StageConfig, config_to_dict, load_stage_config
from bsq.data import DatasetInfo, Loaders, build_loaders, dataset_info
from bsq.engine import Distributed, Hooks, Speed, Trainer, init_seed, seed_all
from bsq.errors import BSQError
from bsq.layout import OUTPUTS
from bsq.presets import switch_values
from bsq.runlock import FolderLock

log = logging.getLogger("bsq")
__all__ = ["Session", "write_json", "write_history", "write_text_atomic"]

# Keys that do not change the result: excluded from the config hash (a resumed job may move device or store)
# and logged as tags instead of params.
VOLATILE = ("device", "progress", "tracking", "data.root", "data.workers", "data.pin_memory", "data.download")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


def write_history(path: str | Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=columns or ["epoch"])
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write)


def _split_volatile(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    stable, volatile = {}, {}
    for key, value in flat.items():
        target = volatile if any(key == v or key.startswith(v + ".") for v in VOLATILE) else stable
        target[key] = value
    return stable, volatile


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Session:
    """One stage job. Construction validates everything it can without side effects (config, input files, output
    names), so bad input fails before any file is written or any MLflow run is created."""

    def __init__(
        self,
        stage: str,
        config: Mapping[str, Any] | StageConfig | None,
        inputs: Mapping[str, Any] | None,
        outputs: Mapping[str, Any] | None,
        *,
        required_inputs: tuple[str, ...] = (),
        optional_inputs: tuple[str, ...] = (),
    ) -> None:
        self.stage = stage
        self.cfg = load_stage_config(stage, config)
        self.inputs = self._check_inputs(inputs or {}, required_inputs, optional_inputs)
        self.outputs = self._check_outputs(outputs or {})
        flat = _flatten(config_to_dict(self.cfg))
        self.params, self.volatile = _split_volatile(flat)
        from bsq.tracking import config_hash

        self.config_hash = config_hash(self.params)
        self.folder = Path(next(iter(self.outputs.values()))).parent
        self.resume_path = self.folder / f".{stage}.resume.pt"
        self.lock = FolderLock(self.folder, stage)
        self.stale_runs: list[str] = []  # MLflow runs that dead processes left RUNNING in this folder
        self.resume: dict[str, Any] | None = None
        self.dist = Distributed.from_env(self.cfg.device)
        self.tracking_uri = self.cfg.tracking.uri or _default_uri(self.cfg.tracking.results_dir)
        if self.cfg.tracking.enabled and self.dist.is_main:
            from bsq.tracking import check_tracking_uri

            check_tracking_uri(self.tracking_uri)  # seconds, not MLflow's minutes of retries per job
        # Everything random before the first epoch (model initialisation, PACT clips, FracBits' probe) draws from
        # the run's seed; each epoch then reseeds from (seed, epoch) in the Trainer.
        seed_all(init_seed(self.cfg.seed))
        self.device = self.dist.device
        self.progress = self.cfg.progress if self.cfg.progress is not None else sys.stderr.isatty()
        self.tracker = None
        self.labels: dict[str, Any] = {}
        self.lineage: list[dict[str, Any]] = []
        self.model_args: dict[str, Any] = {}
        self.policy: dict[str, Any] | None = None
        self.start_metrics: dict[str, Any] = {}  # measured before training; kept in the resume file

    # ---- validation ----------------------------------------------------------------------------------------
    def _check_inputs(self, inputs: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...]):
        given = {k: Path(v) for k, v in inputs.items() if v not in (None, "")}
        unknown = sorted(set(given) - set(required) - set(optional))
        if unknown:
            raise BSQError(
                f"unknown input(s) {unknown} for the {self.stage} stage; it takes {list(required + optional)}"
            )
        missing = [k for k in required if k not in given]
        if missing:
            raise BSQError(f"the {self.stage} stage needs input(s) {missing} (e.g. --input checkpoint=PATH)")
        for key, path in given.items():
            if not path.is_file():
                raise BSQError(f"{self.stage} input {key!r} not found: {path}. Run the upstream stage or fix the path.")
        return given

    def _check_outputs(self, outputs: Mapping[str, Any]) -> dict[str, Path]:
        expected = OUTPUTS[self.stage]
        given = {k: Path(v) for k, v in outputs.items()}
        unknown = sorted(set(given) - set(expected))
        missing = [k for k in expected if k not in given]
        if unknown or missing:
            raise BSQError(
                f"the {self.stage} stage writes exactly {list(expected)}; missing {missing}, unknown {unknown}. "
                "Use default_outputs(stage, out_dir) or --out-dir."
            )
        for path in given.values():
            blocking = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
            if blocking is not None and not blocking.is_dir():
                raise BSQError(
                    f"cannot write {path}: {blocking} is a file, not a folder. Give an output folder (--out-dir) "
                    "that does not exist yet or is a directory."
                )
            if path.is_dir():
                raise BSQError(f"cannot write {path}: it is a folder. Remove it or choose another output path.")
        return given

    # ---- data and model --------------------------------------------------------------------------------------
    def loaders(self) -> Loaders:
        return build_loaders(self.cfg.data, self.cfg.seed, self.device, self.dist.rank, self.dist.world_size)

    def dataset(self) -> DatasetInfo:
        return dataset_info(self.cfg.data.name)

    def activation_overrides(self) -> dict[str, Any]:
        return {"act_bits": self.cfg.model.act_bits, "stem_act_bits": self.cfg.model.stem_act_bits}

    def check_parent(self, parent: dict[str, Any], key: str = "checkpoint") -> None:
        """The upstream checkpoint must be for this config's architecture and dataset."""
        info, args = self.dataset(), parent["model"]
        if args["arch"] != self.cfg.model.arch:
            raise BSQError(
                f"{self.inputs[key]} holds a {args['arch']} but model.arch is {self.cfg.model.arch!r}; use the same "
                "architecture in every stage"
            )
        if args["num_classes"] != info.num_classes or args.get("in_channels", 3) != info.in_channels:
            raise BSQError(
                f"{self.inputs[key]} was trained for {args['num_classes']} classes / {args.get('in_channels', 3)} "
                f"channels, but data.name={info.name!r} has {info.num_classes} / {info.in_channels}"
            )

    def read_parent(self, key: str = "checkpoint", forms: tuple[str, ...] = ("float", "bits", "latent")):
        ckpt = load_checkpoint(self.inputs[key])
        if ckpt["form"] not in forms:
            raise BSQError(
                f"{self.inputs[key]} is a {ckpt['form']}-form checkpoint from the {ckpt['stage']} stage; the "
                f"{self.stage} stage needs one of {list(forms)}"
            )
        self.check_parent(ckpt, key)
        return ckpt

    # ---- tracking ------------------------------------------------------------------------------------------
    def open_run(self, parent: dict[str, Any] | None = None, method: str | None = None, **labels: Any) -> RunScope:
        """Claim the output folder, then start (or, when resuming, reopen) this job's MLflow run; labels and
        lineage extend the parent's. Use as `with s.open_run(parent) as tracker:`; leaving the block ends the run
        (FINISHED, FAILED or KILLED) and frees the folder.

        The method label is the config's `method` when set, else the stage's own (`method`: fracbits, uniform),
        else the parent's (so prune, finetune and evaluate keep the label of what they continue), else bsq."""
        if self.dist.is_main:
            self.lock.acquire()
        try:
            tracker = self._start_tracker(parent, method, labels)
        except BaseException:
            self.lock.release()
            raise
        return RunScope(tracker, self.lock)

    def _start_tracker(self, parent: dict[str, Any] | None, method: str | None, labels: dict[str, Any]):
        from bsq.tracking import Tracker

        cfg = self.cfg
        inherited = (parent or {}).get("labels", {})
        self.labels = {
            **inherited,
            "dataset": cfg.data.name,
            "arch": cfg.model.arch,
            "method": cfg.method or method or inherited.get("method") or "bsq",
            "seed": cfg.seed,
            **cfg.labels,
            **{k: v for k, v in labels.items() if v is not None},
        }
        upstream = list((parent or {}).get("lineage", []))
        if self.lock.previous is not None:
            self.stale_runs.append(self.lock.previous.run_id)
        self.resume = self._read_resume()
        resume_run = self.resume.get("run_id") if self.resume else None
        if self.resume:
            self.start_metrics = dict(self.resume.get("metrics") or {})
        name = self.stage + (f"/alpha={self.labels['alpha']}" if "alpha" in self.labels else "") + f"/seed={cfg.seed}"
        tags = {
            "bsq.stage": self.stage,
            "bsq.method": str(self.labels["method"]),
            "bsq.dataset": cfg.data.name,
            "bsq.arch": cfg.model.arch,
            "bsq.seed": str(cfg.seed),
            "bsq.config_hash": self.config_hash,
            "bsq.preset": cfg.preset,
            **{f"bsq.{k}": str(v) for k, v in self.labels.items() if k not in ("dataset", "arch", "method", "seed")},
            **{f"bsq.{e['stage']}_run_id": e["run_id"] for e in upstream if e.get("run_id")},
            **{f"bsq.{k}": str(v) for k, v in self.volatile.items() if not k.startswith("tracking.")},
            **cfg.tracking.tags,
        }
        parent_run = upstream[-1].get("run_id") if upstream else None
        if parent_run:
            tags["bsq.upstream_run_id"] = parent_run
        self.tracker = Tracker(
            cfg.tracking.experiment or f"bsq-repro-{cfg.data.name}-{cfg.model.arch}",
            name,
            uri=self.tracking_uri,
            tags=tags,
            params=self.params,
            parent_run_id=parent_run,
            resume_run_id=resume_run,
            enabled=cfg.tracking.enabled and self.dist.is_main,
        )
        closed = self.tracker.close_stale(
            self.stale_runs, f"its process died or was replaced; {self.folder} was taken over by a later run"
        )
        if closed:
            log.warning("closed MLflow run(s) %s left RUNNING by a dead process as KILLED", ", ".join(closed))
        self.lock.record_run(self.tracker.run_id)
        self.lineage = upstream + [
            {"stage": self.stage, "run_id": self.tracker.run_id, "experiment_id": self.tracker.experiment_id}
        ]
        return self.tracker

    # ---- resume --------------------------------------------------------------------------------------------
    def _read_resume(self) -> dict[str, Any] | None:
        """The resume file of an interrupted run of this same config, else None. A file for another config or a
        corrupt one is moved aside (never deleted) and the stage starts over. Under DDP rank 0 decides (it holds
        the folder lock) and the other ranks read what it kept."""
        if not self.dist.is_main:
            self.dist.barrier()
            return load_checkpoint(self.resume_path) if self.resume_path.exists() else None
        resume = self._check_resume_file()
        self.dist.barrier()
        return resume

    def _check_resume_file(self) -> dict[str, Any] | None:
        path = self.resume_path
        if not path.exists():
            return None
        try:
            ckpt = load_checkpoint(path)
        except BSQError as exc:
            aside = path.with_suffix(".corrupt")
            os.replace(path, aside)
            log.warning("resume file unreadable (%s); moved to %s, starting over", exc, aside)
            return None
        if ckpt.get("config_hash") != self.config_hash:
            aside = path.with_name(f"{path.stem}.{ckpt.get('config_hash', 'unknown')}.stale.pt")
            os.replace(path, aside)
            log.warning("resume file is for another config; moved to %s, starting over", aside)
            self.stale_runs.append(ckpt.get("run_id"))
            return None
        return ckpt

    def trainer(
        self,
        model: nn.Module,
        loaders: Loaders,
        tracker: Any,
        hooks: Hooks | None = None,
        keep_best: bool = False,
        best_after: int = 0,
        lr_per_step: bool = False,
    ) -> Trainer:
        """The shared training loop wired to this job: its recipe, seed, devices, MLflow run and resume file."""
        return Trainer(
            model,
            loaders.train,
            loaders.test,
            self.cfg.optim,
            seed=self.cfg.seed,
            dist=self.dist,
            hooks=hooks,
            log_metrics=tracker.log_metrics,
            save_resume=self.save_resume,
            keep_best=keep_best,
            best_after=best_after,
            lr_per_step=lr_per_step,
            progress=self.progress,
            speed=Speed.resolve(self.cfg.speed, self.device),
            resume=self.resume,
        )

    def save_resume(self, model: nn.Module, payload: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_checkpoint(self.resume_path, self.checkpoint(model, self.start_metrics, resume=True, **payload))

    # ---- outputs -------------------------------------------------------------------------------------------
    def checkpoint(self, model: nn.Module, metrics: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return make_checkpoint(
            model,
            stage=self.stage,
            model_args=self.model_args,
            policy=self.policy,
            config=config_to_dict(self.cfg),
            labels=self.labels,
            lineage=self.lineage,
            metrics=metrics,
            config_hash=self.config_hash,
            run_id=self.tracker.run_id if self.tracker else None,
            **extra,
        )

    def save_model(
        self, key: str, model: nn.Module, metrics: dict[str, Any], epoch: int | None = None, **extra: Any
    ) -> None:
        if self.dist.is_main:
            save_checkpoint(self.outputs[key], self.checkpoint(model, metrics, epoch=epoch, **extra))

    def finish(self, metrics: dict[str, Any], history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write metrics.json, history.csv and run.json, attach them to the run, drop the resume file."""
        if not self.dist.is_main:
            return metrics
        fidelity = {"preset": self.cfg.preset, "switches": switch_values(config_to_dict(self.cfg))}
        record = {"stage": self.stage, "labels": self.labels, **fidelity, **metrics}
        write_json(self.outputs["metrics"], record)
        if history is not None and "history" in self.outputs:
            write_history(self.outputs["history"], history)
        tracker = self.tracker
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            for key in ("metrics", "history", "scheme", "layers"):
                if key in self.outputs and self.outputs[key].exists():
                    tracker.log_artifact(self.outputs[key])
        run = {
            "stage": self.stage,
            "status": "FINISHED",
            "run_id": tracker.run_id if tracker else None,
            "experiment_id": tracker.experiment_id if tracker else None,
            "tracking_uri": tracker.uri if tracker else None,
            "labels": self.labels,
            "lineage": self.lineage,
            "config_hash": self.config_hash,
            **fidelity,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            "outputs": {k: str(v) for k, v in self.outputs.items()},
        }
        write_json(self.outputs["run"], run)
        self.resume_path.unlink(missing_ok=True)
        return record


class RunScope:
    """The `with` block of one job: yields its Tracker; on leaving, ends the MLflow run and frees the folder."""

    def __init__(self, tracker: Any, lock: FolderLock) -> None:
        self.tracker, self.lock = tracker, lock

    def __enter__(self) -> Any:
        return self.tracker

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.tracker.__exit__(exc_type, exc, tb)
        finally:
            self.lock.release()
        return False


def _default_uri(results_dir: str) -> str:
    from bsq.tracking import default_tracking_uri

    return default_tracking_uri(results_dir)

"""What a stage job writes: its checkpoints (and resume file), metrics.json, history.csv, run.json and the other
declared outputs, every one through `bsq.atomic`, and only on rank 0 under DDP.

Every checkpoint and record says where it came from: the resolved config and its hash, the run's labels and
lineage, the MLflow run, the fidelity preset and switches (`bsq.presets`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bsq.atomic import atomic_write, write_text_atomic
from bsq.checkpoint import make_checkpoint, save_checkpoint
from bsq.config import config_to_dict
from bsq.presets import switch_values
from bsq.stages.context import RunContext
from bsq.stages.lineage import Run

__all__ = ["Artifacts", "write_json", "write_history", "write_text_atomic"]

RUN_ARTIFACTS = ("metrics", "history", "scheme", "layers", "hessian")  # outputs attached to the MLflow run
MODEL_ARTIFACTS = ("checkpoint", "float_checkpoint")  # the final model(s), under model/ (tracking.log_model)


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


@dataclass(frozen=True)
class Artifacts:
    """The writer of one opened job: `model_args` and `policy` are what its checkpoints say the model is."""

    ctx: RunContext
    run: Run
    model_args: Mapping[str, Any]
    policy: Mapping[str, Any] | None = None

    @property
    def fidelity(self) -> dict[str, Any]:
        """The fidelity preset and the value of every switch (bsq.presets), as metrics.json and run.json say."""
        cfg = self.ctx.cfg
        return {"preset": cfg.preset, "switches": switch_values(config_to_dict(cfg))}

    @property
    def writes(self) -> bool:
        """Only rank 0 writes files and logs to MLflow."""
        return self.ctx.dist.is_main

    def checkpoint(self, model: nn.Module, metrics: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return make_checkpoint(
            model,
            stage=self.ctx.stage,
            model_args=dict(self.model_args),
            policy=dict(self.policy) if self.policy is not None else None,
            config=config_to_dict(self.ctx.cfg),
            labels=dict(self.run.labels),
            lineage=self.run.lineage,
            metrics=dict(metrics) if metrics is not None else None,
            config_hash=self.ctx.config_hash,
            run_id=self.run.tracker.run_id,
            **extra,
        )

    def save_model(
        self, key: str, model: nn.Module, metrics: Mapping[str, Any], epoch: int | None = None, **extra: Any
    ) -> None:
        if self.writes:
            save_checkpoint(self.ctx.outputs[key], self.checkpoint(model, metrics, epoch=epoch, **extra))

    def save_resume(self, model: nn.Module, start_metrics: Mapping[str, Any], payload: dict[str, Any]) -> None:
        """The resume file after an epoch: the model, the metrics measured before training, the trainer's state."""
        if self.writes:
            self.ctx.resume_file.save(self.checkpoint(model, start_metrics, resume=True, **payload))

    def write_json(self, key: str, data: Mapping[str, Any]) -> None:
        if self.writes:
            write_json(self.ctx.outputs[key], data)

    def write_layers(self, key: str, model: nn.Module) -> None:
        """The per-layer table (bsq.metrics.layer_table) as CSV, the share of ones per plane space-separated."""
        from bsq.metrics import layer_table
        from bsq.stages.measure import input_size

        table = layer_table(model, input_size(self.ctx.dataset(), self.ctx.cfg.data.image_size))
        table["ones_pct"] = table["ones_pct"].map(lambda z: " ".join(f"{v:g}" for v in z))
        if self.writes:
            write_text_atomic(self.ctx.outputs[key], table.to_csv(index=False))

    def finish(self, metrics: dict[str, Any], history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write metrics.json, history.csv and run.json, attach them to the run, drop the resume file; returns
        the metrics record (rank 0) or `metrics` (other ranks)."""
        if not self.writes:
            return metrics
        ctx, tracker = self.ctx, self.run.tracker
        fidelity = self.fidelity
        record = {"stage": ctx.stage, "labels": dict(self.run.labels), **fidelity, **metrics}
        write_json(ctx.outputs["metrics"], record)
        if history is not None and "history" in ctx.outputs:
            write_history(ctx.outputs["history"], history)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for key in RUN_ARTIFACTS:
            if key in ctx.outputs and ctx.outputs[key].exists():
                tracker.log_artifact(ctx.outputs[key])
        if ctx.cfg.tracking.log_model:
            for key in MODEL_ARTIFACTS:
                if key in ctx.outputs and ctx.outputs[key].exists():
                    tracker.log_artifact(ctx.outputs[key], "model")
        write_json(ctx.outputs["run"], self._run_record(metrics, fidelity))
        ctx.resume_file.remove()
        return record

    def _run_record(self, metrics: Mapping[str, Any], fidelity: Mapping[str, Any]) -> dict[str, Any]:
        tracker = self.run.tracker
        return {
            "stage": self.ctx.stage,
            "status": "FINISHED",
            "run_id": tracker.run_id,
            "experiment_id": tracker.experiment_id,
            "tracking_uri": tracker.uri,
            "labels": dict(self.run.labels),
            "lineage": self.run.lineage,
            "config_hash": self.ctx.config_hash,
            **fidelity,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            "outputs": {k: str(v) for k, v in self.ctx.outputs.items()},
        }

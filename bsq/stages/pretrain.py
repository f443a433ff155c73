"""Full-precision pretraining (spec §8.1: SGD 0.9, wd 1e-4, 350 epochs, x0.1 at 150/250/325), or the import of an
existing float checkpoint (ours, or the authors' `model_best.pth.tar`) with optional further training.

The saved model is the best test-accuracy epoch, as the authors' `model_best.pth.tar` (spec P14); metrics.json
records both the best and the final epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from bsq.checkpoint import Form, build_model, load_checkpoint, load_model
from bsq.config import check_epochs
from bsq.engine import FitResult
from bsq.errors import BSQError
from bsq.official import official_model
from bsq.stages.context import RunContext, open_context
from bsq.stages.skeleton import Training, TrainingPlan, run_training


def _import(ctx: RunContext, model_args: dict[str, Any], path: Path) -> nn.Module:
    """A bsq-repro float checkpoint, or an official float checkpoint of the same architecture."""
    try:
        ckpt = load_checkpoint(path)
    except BSQError:  # not ours: one of the authors' files (which raises its own clear error when unreadable)
        return official_model(model_args, path, who="pretrain")
    if ckpt["form"] != Form.FLOAT:
        raise BSQError(f"{path} is a {ckpt['form']}-form checkpoint; pretrain imports float checkpoints only")
    ctx.check_parent(ckpt, "import_checkpoint")
    return load_model(ckpt, ctx.activation_overrides(), path)


def _final_metrics(job: Training, fit: FitResult) -> dict[str, Any]:
    if not fit.history:  # 0 epochs: the imported model as it is
        start = job.start_metrics
        return {"top1": start["imported_top1"], "top5": start["imported_top5"], "selection": "imported"}
    return {
        "top1": fit.best["test_top1"],
        "top5": fit.best["test_top5"],
        "best_epoch": int(fit.best["epoch"]),
        "final_top1": fit.history[-1]["test_top1"],
        "selection": "best test top-1 epoch (as the authors' model_best)",
    }


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("pretrain", config, inputs, outputs)
    imported = ctx.inputs.get("import_checkpoint")
    check_epochs(ctx.cfg, imports_checkpoint=bool(imported))  # 0 epochs only with an import: known now, not at read
    model_args = ctx.cfg.model_args()
    loaders = ctx.loaders()
    # Built (and so validated) before the run opens; the seed fixes the initial weights.
    model = _import(ctx, model_args, imported) if imported else build_model(model_args, Form.FLOAT, None, {})
    plan = TrainingPlan(
        parent=None,
        loaders=loaders,
        model=model,
        model_args=model_args,
        final_metrics=_final_metrics,
        tags={"bsq.imported_from": str(imported)} if imported else {},
        evaluate_start=bool(imported),
        start_metrics=(lambda job, start: {f"imported_{k}": v for k, v in start.items()}) if imported else None,
        keep_best=True,
    )
    return run_training(ctx, plan)

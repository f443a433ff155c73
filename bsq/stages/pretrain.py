"""Full-precision pretraining (spec §8.1: SGD 0.9, wd 1e-4, 350 epochs, x0.1 at 150/250/325), or the import of an
existing float checkpoint (ours, or the authors' `model_best.pth.tar`) with optional further training.

The saved model is the best test-accuracy epoch, as the authors' `model_best.pth.tar` (spec P14); metrics.json
records both the best and the final epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.checkpoint import build_model, load_checkpoint, load_model
from bsq.config import check_epochs
from bsq.engine import evaluate
from bsq.errors import BSQError
from bsq.stages.common import Session

INPUTS = ("import_checkpoint",)


def _import(session: Session, path) -> Any:
    """A bsq-repro float checkpoint, or an official float checkpoint of the same architecture."""
    from bsq.official import load_official_state, read_official_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except BSQError as ours:
        official = read_official_checkpoint(path)  # raises its own clear error for unreadable files
        if official.get("Nbit_dict"):
            raise BSQError(f"{path} is a bit-form checkpoint; pretrain imports float checkpoints only") from ours
        model = build_model(session.model_args, "float", None, {})
        return load_official_state(model, official)
    if ckpt["form"] != "float":
        raise BSQError(f"{path} is a {ckpt['form']}-form checkpoint; pretrain imports float checkpoints only")
    session.check_parent(ckpt, "import_checkpoint")
    return load_model(ckpt, session.activation_overrides(), path)


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    s = Session("pretrain", config, inputs, outputs, optional_inputs=INPUTS)
    cfg = s.cfg
    imported = s.inputs.get("import_checkpoint")
    check_epochs(cfg, imports_checkpoint=bool(imported))  # 0 epochs only with an import: known now, not at read
    s.model_args = cfg.model_args()
    loaders = s.loaders()
    # Built (and so validated) before the run opens; the seed fixes the initial weights.
    model = _import(s, imported) if imported else build_model(s.model_args, "float", None, {})
    with s.open_run(None) as tracker:
        if imported:
            tracker.set_tags({"bsq.imported_from": str(imported)})
        if s.resume:
            model = load_model(s.resume, path=s.resume_path)
        model.to(s.device)
        if imported and not s.resume:
            start = evaluate(model, loaders.test, s.device, s.progress)
            s.start_metrics.update({f"imported_{k}": v for k, v in start.items()})
            tracker.log_metrics(s.start_metrics, step=0)
        metrics: dict[str, Any] = dict(s.start_metrics)
        trainer = s.trainer(model, loaders, tracker, keep_best=True)
        result = trainer.fit()
        if result.history:
            last = result.history[-1]
            model.load_state_dict(result.best_state)
            metrics.update(
                top1=result.best["test_top1"],
                top5=result.best["test_top5"],
                best_epoch=int(result.best["epoch"]),
                final_top1=last["test_top1"],
                selection="best test top-1 epoch (as the authors' model_best)",
            )
        else:
            metrics.update(top1=metrics["imported_top1"], top5=metrics["imported_top5"], selection="imported")
        s.save_model("checkpoint", model, metrics, epoch=cfg.optim.epochs)
        return s.finish(metrics, result.history)

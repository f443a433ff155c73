"""The skeleton every training stage shares, written once.

A training stage reads its parent, builds its loaders and its model *before* the run opens (so a wrong file or
setting fails without leaving a FAILED run behind), and hands them over in a `TrainingPlan`. `run_training` then:

open the run (folder lock, resume file, MLflow run) -> restore the model from the resume file, or keep the built
one -> move it to the device -> `prepare` -> (fresh start only) evaluate and record the start metrics -> train
with the stage's hooks, resuming exactly -> reload the best epoch (`keep_best`) -> the stage's final metrics ->
save the checkpoint and the stage's other outputs -> metrics.json, history.csv, run.json.

The order of everything that draws random numbers is the one the stages always had (the model is built after the
seed and the loaders; the start evaluation comes before the first epoch, which reseeds from (seed, epoch)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bsq.checkpoint import load_model
from bsq.data import Loaders
from bsq.engine import FitResult, Hooks, Speed, Trainer, evaluate
from bsq.stages.artifacts import Artifacts
from bsq.stages.context import RunContext
from bsq.stages.lineage import Run, open_run

__all__ = ["TrainingPlan", "Training", "run_training"]


@dataclass(frozen=True)
class TrainingPlan:
    """What a training stage brings to the skeleton.

    - `parent`: the upstream checkpoint (labels and lineage are inherited), None for pretrain;
    - `model`, `loaders`: built before the run opens; `model_args`, `policy`: what its checkpoints record;
    - `method`, `labels`, `tags`: the run's method label, extra labels (the config's `labels` win) and MLflow tags;
    - `prepare(training)`: after the model is on its device, fresh or resumed (e.g. FracBits' cost model);
    - `evaluate_start`: evaluate the model before training (fresh start only); `start_metrics(training,
      evaluation)`: the metrics measured before training (logged at step 0, kept in the resume file), None for
      none; `start_is_candidate`: the start state competes for the best epoch (the authors' finetune);
    - `hooks(training)`: the stage's training hooks; `keep_best`, `best_after`, `lr_per_step`: see `Trainer`;
    - `export(training)`: converts `training.model` in place to the form the stage's checkpoint is saved in (CSQ's
      and MSQ's training layers become BSQ bit layers), after the best epoch is reloaded and before the final
      metrics, so they measure the exported model; None = saved as trained;
    - `final_metrics(training, fit)`: the stage's metrics after training (the best epoch reloaded when
      `keep_best`), merged after the start metrics;
    - `outputs(training, metrics)`: the stage's outputs besides `checkpoint`, metrics, history and run.
    """

    parent: Mapping[str, Any] | None
    loaders: Loaders
    model: nn.Module
    model_args: Mapping[str, Any]
    final_metrics: Callable[[Training, FitResult], dict[str, Any]]
    policy: Mapping[str, Any] | None = None
    method: str | None = None
    labels: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    prepare: Callable[[Training], None] | None = None
    evaluate_start: bool = True
    start_metrics: Callable[[Training, dict[str, float] | None], dict[str, Any]] | None = None
    start_is_candidate: bool = False
    hooks: Callable[[Training], Hooks] | None = None
    keep_best: bool = False
    best_after: int = 0
    lr_per_step: bool = False
    outputs: Callable[[Training, dict[str, Any]], None] | None = None
    export: Callable[[Training], None] | None = None


@dataclass
class Training:
    """A training job while it runs: what the plan's callables read. `start_metrics` is the one record that
    grows during training (FracBits adds its hard assignment): the resume file carries it."""

    ctx: RunContext
    run: Run
    plan: TrainingPlan
    model: nn.Module
    artifacts: Artifacts
    start_metrics: dict[str, Any]
    trainer: Trainer | None = None

    @property
    def resumed(self) -> bool:
        return self.run.resume is not None

    def evaluate(self) -> dict[str, float]:
        """Test loss, top-1 and top-5 of the model now."""
        return evaluate(self.model, self.plan.loaders.test, self.ctx.device, self.ctx.progress)


def run_training(ctx: RunContext, plan: TrainingPlan) -> dict[str, Any]:
    """Run a training stage (see the module); returns its metrics record."""
    with open_run(ctx, plan.parent, method=plan.method, labels=plan.labels) as run:
        if plan.tags:
            run.tracker.set_tags(dict(plan.tags))
        model = load_model(run.resume, path=ctx.resume_file.path) if run.resume else plan.model
        model.to(ctx.device)
        artifacts = Artifacts(ctx, run, plan.model_args, plan.policy)
        start = dict(run.resume.get("metrics") or {}) if run.resume else {}
        job = Training(ctx, run, plan, model, artifacts, start)
        if plan.prepare is not None:
            plan.prepare(job)
        evaluation = _start(job) if not job.resumed else None
        job.trainer = _trainer(job)
        if plan.start_is_candidate and evaluation is not None:
            job.trainer.add_start_candidate(evaluation)
        result = job.trainer.fit()
        if plan.keep_best and result.best_state is not None:
            model.load_state_dict(result.best_state)
        if plan.export is not None:
            plan.export(job)
        metrics = {**job.start_metrics, **plan.final_metrics(job, result)}
        artifacts.save_model("checkpoint", model, metrics, epoch=ctx.cfg.optim.epochs)
        if plan.outputs is not None:
            plan.outputs(job, metrics)
        return artifacts.finish(metrics, result.history)


def _start(job: Training) -> dict[str, float] | None:
    """A fresh start: the start evaluation and the start metrics, logged at step 0."""
    evaluation = job.evaluate() if job.plan.evaluate_start else None
    if job.plan.start_metrics is not None:
        job.start_metrics.update(job.plan.start_metrics(job, evaluation))
        job.run.tracker.log_metrics(job.start_metrics, step=0)
    return evaluation


def _trainer(job: Training) -> Trainer:
    """The shared training loop wired to this job: its recipe, seed, devices, MLflow run and resume file."""
    ctx, plan = job.ctx, job.plan
    return Trainer(
        job.model,
        plan.loaders.train,
        plan.loaders.test,
        ctx.cfg.optim,
        seed=ctx.cfg.seed,
        dist=ctx.dist,
        hooks=plan.hooks(job) if plan.hooks is not None else None,
        log_metrics=job.run.tracker.log_metrics,
        save_resume=lambda model, payload: job.artifacts.save_resume(model, job.start_metrics, payload),
        keep_best=plan.keep_best,
        best_after=plan.best_after,
        lr_per_step=plan.lr_per_step,
        progress=ctx.progress,
        speed=Speed.resolve(ctx.cfg.speed, ctx.device),
        resume=job.run.resume,
    )

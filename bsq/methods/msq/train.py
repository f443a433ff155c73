"""MSQ (Han et al., ICCV 2025, arXiv 2507.22349) as one stage: a labelled reconstruction (no public code; every
choice is a switch in `config.py`, methods-next.md MSQ).

1. the float model's chosen layers (BSQ's `quant` selection) become MSQ layers at `msq.init_bits`: float weights,
   round-clamp quantized in the forward (`bsq.quant.lsb`), the only trainable tensors (no bit planes);
2. training on CE + lambda R, R the L1 norm of the LSB residuals of the layers above `min_bits`;
3. at the start of every `prune_interval`-th epoch up to `prune_until`, layers whose share of non-zero residuals is
   <= `threshold` drop LSBs (2 below the mean Hessian sensitivity, else 1); pruning stops at the cost target (a BSQ
   run's measured compression / size / BitOPs, or `msq.target`), and at the last step `force` meets it;
4. the rest of the epochs finetune with the bits fixed (no regulariser); the best test epoch after pruning is kept,
   exported in place to BSQ's bit form (the same forward, exactly) and saved.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bsq.budgets import budget_labels, read_budget
from bsq.checkpoint import Form, load_model
from bsq.engine import EpochAction, FitResult, Hooks
from bsq.errors import BSQError
from bsq.methods.msq.config import MSQConfig
from bsq.methods.msq.layers import MSQPolicy, export_, msq_layers, msq_quantize_model, training_footprint
from bsq.methods.msq.prune import Budget, budget_from_record, first_batches, force_budget, prune_step, sensitivities
from bsq.metrics import summary
from bsq.quant import lsb
from bsq.quant.convert import export_scheme
from bsq.stages.context import RunContext, open_context
from bsq.stages.measure import cost_metrics, input_size
from bsq.stages.skeleton import Training, TrainingPlan, run_training

log = logging.getLogger("bsq")

RECONSTRUCTION = "reconstruction of MSQ (arXiv 2507.22349): no public code, choices labelled in bsq.methods.msq"


def _read_budget(ctx: RunContext) -> dict[str, Any] | None:
    """The budget input (a BSQ run's metrics.json), None without one; never both it and msq.target."""
    if "budget" not in ctx.inputs:
        return None
    record = read_budget(ctx.inputs["budget"], "MSQ")
    if ctx.cfg.msq.target is not None:
        raise BSQError("give either msq.target or a budget input, not both")
    return record


def penalty(model: nn.Module, cfg: MSQConfig) -> torch.Tensor | None:
    """lambda R, R = sum over the layers above min_bits of sum |r_l| (a layer at min_bits has no LSB left to drop,
    ours; r / G_n with `msq.units: value`), divided per `msq.normalize`: by every regularised weight (model: a
    constant, so lambda's pull per weight stays the same as layers leave), by each layer's count (layer), or not
    (none). None if no layer is left or lambda is 0."""
    regularized = [layer for _, layer in msq_layers(model) if layer.regularized]
    layers = [layer for layer in regularized if layer.nbits > cfg.min_bits]
    if not layers or cfg.lam == 0:
        return None
    sums = [layer.residual().abs().sum() for layer in layers]
    if cfg.units == "value":  # r / G_n: the LSB's value on the normalised weight
        sums = [total / lsb.grid(layer.nbits, layer.levels) for total, layer in zip(sums, layers, strict=True)]
    if cfg.normalize == "layer":
        sums = [total / layer.weight.numel() for total, layer in zip(sums, layers, strict=True)]
    value = torch.stack(sums).sum()
    if cfg.normalize == "model":
        value = value / sum(layer.weight.numel() for layer in regularized)
    return cfg.lam * value


def _sync_bits(model: nn.Module, world_size: int) -> None:
    """Under DDP every rank takes rank 0's bits: the Hessian batches (and so a sensitivity) differ by rank."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    for _, layer in msq_layers(model):
        dist.broadcast(layer.msq_nbits, 0)
        layer.set_bits_(int(layer.msq_nbits))


class _Schedule:
    """MSQ's one-run schedule around the shared skeleton: the regulariser while pruning may still happen, the
    pruning steps, and the metrics of both phases."""

    def __init__(self, cfg: MSQConfig, epochs: int, budget: Budget | None) -> None:
        self.cfg, self.budget = cfg, budget
        self.steps, self.end = cfg.prune_epochs(epochs), cfg.prune_end(epochs)
        self.frozen = False  # bits fixed: after the last pruning step, or once the target is reached

    def add_penalty(self, m: nn.Module) -> torch.Tensor | None:
        if self.frozen:
            return None
        value = penalty(m, self.cfg)
        if value is None:
            return None
        value.backward()
        return value.detach()

    def on_epoch_start(self, job: Training, epoch: int, m: nn.Module) -> tuple[dict[str, float], EpochAction | None]:
        budget = self.budget
        if epoch not in self.steps or self.frozen:
            self.frozen = epoch >= self.end or (budget is not None and budget.reached(m))
            return {}, None

        def sensitivity() -> dict[str, float]:
            batches = first_batches(job.plan.loaders.train, self.cfg.hessian_batches)
            return sensitivities(m, batches, job.ctx.device, self.cfg.hessian_samples, job.ctx.cfg.seed + epoch)

        step = prune_step(m, self.cfg, budget, sensitivity)
        forced = {}
        if epoch == self.end and self.cfg.force and budget is not None and not step.reached:
            forced = force_budget(m, self.cfg, budget)
        _sync_bits(m, job.ctx.dist.world_size)
        record = job.start_metrics
        record["prune_steps"] = record.get("prune_steps", 0) + 1
        record["lsbs_dropped"] = record.get("lsbs_dropped", 0) + sum(step.drops.values())
        record["lsbs_forced"] = record.get("lsbs_forced", 0) + sum(forced.values())
        self.frozen = epoch >= self.end or (budget is not None and budget.reached(m))
        if budget is not None and budget.reached(m) and "budget_reached_epoch" not in record:
            record["budget_reached_epoch"] = epoch
        out = {"prune_layers": float(len(step.drops)), "prune_lsbs": float(sum(step.drops.values()))}
        out["forced_lsbs"] = float(sum(forced.values()))
        out.update({f"sensitivity/{k}": v for k, v in (step.sensitivity or {}).items()})
        log.info("MSQ pruning at epoch %d: %s, forced %s", epoch, step.drops, forced)
        return out, None  # the parameters are unchanged: the optimizer and its momentum carry on

    def epoch_metrics(self, m: nn.Module) -> dict[str, float]:
        current = summary(m)
        out = {"avg_bits": current["avg_bits"], "compression": current["compression"]}
        if self.budget is not None:
            out["cost"] = self.budget.cost(m)
        for name, layer in msq_layers(m):
            out[f"bits/{name}"] = float(layer.nbits)
            out[f"lsb_nonzero/{name}"] = layer.nonzero_share()
        return out

    def hooks(self, job: Training) -> Hooks:
        return Hooks(
            after_backward=self.add_penalty,
            on_epoch_start=lambda epoch, m: self.on_epoch_start(job, epoch, m),
            epoch_metrics=self.epoch_metrics,
        )

    def budget_metrics(self, job: Training) -> dict[str, Any]:
        budget = self.budget
        if budget is None:
            return {"budget_met": None}
        achieved = budget.cost(job.model)
        error = achieved / budget.target - 1
        return {
            "target": budget.target,
            "target_requested": budget.requested,
            "match": budget.match,
            "cost_kind": budget.kind,
            "achieved_cost": achieved,
            "cost_rel_error": error,
            "tolerance": self.cfg.tolerance,
            "budget_met": error <= self.cfg.tolerance,
        }

    def final_metrics(self, job: Training, fit: FitResult) -> dict[str, Any]:
        final = job.evaluate()  # the exported bit-form model
        return {
            "top1": final["top1"],
            "top5": final["top5"],
            "best_epoch": fit.best.get("epoch"),
            "final_top1": fit.history[-1]["test_top1"],
            "prune_end_epoch": self.end,
            "reconstruction": True,
            "selection": "best test top-1 epoch after the last pruning step",
            **self.budget_metrics(job),
            **cost_metrics(job.model, job.plan.loaders.info, job.ctx.cfg.data.image_size),
        }


def _model(ctx: RunContext, parent: Mapping[str, Any]) -> nn.Module:
    cfg = ctx.cfg
    policy = MSQPolicy(
        nbits=cfg.msq.init_bits, bias_bits=cfg.msq.fc_bias_bits, levels=cfg.msq.levels, **ctx.bit_policy()
    )
    model = load_model(dict(parent), ctx.activation_overrides(), ctx.inputs["checkpoint"])
    return msq_quantize_model(model, policy)


def _labels(cfg: MSQConfig, budget: Budget | None, record: Mapping[str, Any] | None) -> dict[str, Any]:
    labels: dict[str, Any] = {"reconstruction": "true"}
    if budget is not None:
        labels.update(target=f"{budget.requested:.6g}", match=cfg.match)
    if record is not None:
        labels.update({k: v for k, v in budget_labels(record, cfg.match).items() if k != "match"})
    return labels


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("msq", config, inputs, outputs)
    cfg, m = ctx.cfg, ctx.cfg.msq
    end = m.prune_end(cfg.optim.epochs)
    record = _read_budget(ctx)
    parent = ctx.read_parent("checkpoint", forms=(Form.FLOAT,))
    loaders = ctx.loaders()
    shape = input_size(loaders.info, cfg.data.image_size)
    model = _model(ctx, parent)  # built (and so validated) before the run opens
    requested = m.target if record is None else budget_from_record(record, m.match)
    budget = Budget(model, m.match, requested, shape) if requested is not None else None
    schedule = _Schedule(m, cfg.optim.epochs, budget)
    plan = TrainingPlan(
        parent=parent,
        loaders=loaders,
        model=model,
        model_args={**parent["model"], **ctx.activation_overrides()},
        policy=ctx.bit_policy(),  # BSQ's: the final checkpoint is in bit form
        method="msq",
        labels=_labels(m, budget, record),
        tags={"bsq.reconstruction": RECONSTRUCTION},
        start_metrics=lambda job, start: {
            "initial_top1": start["top1"],
            **({"initial_cost": budget.cost(job.model)} if budget is not None else {}),
            **training_footprint(job.model, m.init_bits),
        },
        hooks=schedule.hooks,
        keep_best=True,
        best_after=end,
        export=lambda job: export_(job.model),
        final_metrics=schedule.final_metrics,
        outputs=lambda job, metrics: job.artifacts.write_json("scheme", export_scheme(job.model)),
    )
    return run_training(ctx, plan)

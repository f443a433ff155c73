"""FracBits (Yang & Jin, AAAI 2021) as one stage, the official one-run schedule (fracbits.md §1.7):

1. the float model gets DoReFa weights and PACT input activations at fractional bit-widths lambda (initialised at the
   target's uniform-equivalent bits + 0.5, or `fracbits.init_bits`);
2. search: weights, PACT clips and lambda train on CE + kappa |C(lambda) - C_t| (C = size in MB or BitOPs in G);
3. after `search_epochs` epochs (default int(0.8 E) + 1: the official 121 of 150), a global offset in [-1, 0] is
   bisected so the rounded policy costs within `tolerance` of the target, and the bits are frozen there;
4. finetune: plain QAT with the fixed policy; the cosine schedule just continues, the optimizer keeps its momentum.

The target is `fracbits.target`, or a measured budget: the `budget` input is a BSQ run's metrics.json (prune or
evaluate) and `fracbits.match` picks its compression, size or BitOPs, so the tables compare methods at equal cost.
The saved model is the best test-accuracy epoch *after* the hard assignment (earlier epochs are not discrete models;
`fracbits.best_epoch: all` counts them too, as the authors);
metrics.json records it, the final epoch, and the accuracy right after the hard assignment ("before finetuning").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from bsq.budgets import budget_labels, read_budget
from bsq.checkpoint import Form
from bsq.engine import EpochAction, FitResult, Hooks, evaluate
from bsq.errors import BSQError
from bsq.methods.fracbits.config import FracBitsConfig
from bsq.methods.fracbits.cost import CostModel, hard_assign, penalty, target_from_budget
from bsq.quant.frac import clamp_frac_bits_, frac_layers, frac_scheme
from bsq.quant.qat import activation_range, qat_model, qat_model_args, qat_policy
from bsq.stages.context import RunContext, open_context
from bsq.stages.measure import cost_metrics, input_size
from bsq.stages.skeleton import Training, TrainingPlan, run_training

log = logging.getLogger("bsq")


def _read_target_inputs(ctx: RunContext) -> dict[str, Any] | None:
    """The budget input (a BSQ run's metrics.json), or None when `fracbits.target` gives the target."""
    budget = read_budget(ctx.inputs["budget"], "FracBits") if "budget" in ctx.inputs else None
    target = ctx.cfg.fracbits.target
    if budget is not None and target is not None:
        raise BSQError("give either fracbits.target or a budget input, not both")
    if budget is None and target is None:
        raise BSQError(
            "FracBits needs a target: set fracbits.target (MB for cost: size, G for cost: bitops) or give a budget "
            "input, the metrics.json of a BSQ run (--budget PATH) to compare at equal cost"
        )
    return budget


@torch.no_grad()
def _init_bits_(model: nn.Module, bits: float) -> None:
    for _, layer in frac_layers(model):
        if layer.searches_weight:
            layer.wbits.fill_(bits)
        if layer.searches_act:
            layer.abits.fill_(bits)
    clamp_frac_bits_(model)


def projection(project: str) -> Callable[[nn.Module], None] | None:
    """The after-step hook of `fracbits.project`: ours projects lambda onto its range after every step; the
    authors' lambda is a free parameter clamped only where it is used, in the quantizer and the cost (fracbits.md
    §1.3), so a lambda pushed past a bound stays there until the penalty pulls it back."""
    return clamp_frac_bits_ if project == "step" else None


def _labels(f: FracBitsConfig, target: float, budget: dict[str, Any] | None) -> dict[str, Any]:
    labels = {"target": f"{target:.6g}", "cost": f.cost}
    labels.update(budget_labels(budget, f.match))
    return labels


class _Schedule:
    """FracBits' one-run schedule around the shared skeleton: the cost model of the model being trained, the
    penalty while searching, the hard assignment at `search_epochs`, and the metrics of both phases."""

    def __init__(self, f: FracBitsConfig, search_epochs: int, target: float, shape: tuple[int, ...]) -> None:
        self.f, self.search_epochs, self.target, self.shape = f, search_epochs, target, shape
        self.cost: CostModel | None = None

    def prepare(self, job: Training) -> None:
        self.cost = CostModel(job.model, self.shape, self.f.cost)  # of the model on its device, fresh or resumed

    @staticmethod
    def searching(m: nn.Module) -> bool:
        return not any(layer.is_hard for _, layer in frac_layers(m))

    def add_penalty(self, m: nn.Module) -> torch.Tensor | None:
        if not self.searching(m):
            return None  # the penalty is off after the hard assignment
        value = penalty(self.cost(), self.target, self.f.kappa, self.f.normalize)
        value.backward()
        return value.detach()

    def assign(self, job: Training, epoch: int, m: nn.Module) -> tuple[dict[str, float], EpochAction | None]:
        f, target = self.f, self.target
        if epoch != self.search_epochs or not self.searching(m):
            return {}, None
        result = hard_assign(m, self.cost, target, f.tolerance, f.bisection_trials, f.bisection)
        record = result.as_metrics(f.tolerance)
        if not record["budget_met"]:
            log.warning(
                "FracBits hard assignment: the closest policy costs %.4g %s, %+.1f %% off the target %.4g",
                result.cost,
                self.cost.unit,
                100 * result.relative_error,
                target,
            )
        after = evaluate(m, job.plan.loaders.test, job.ctx.device, job.ctx.progress)
        job.start_metrics.update(record, top1_before_ft=after["top1"], top5_before_ft=after["top5"])
        return {**record, "hard_top1": after["top1"]}, EpochAction.REWRAP

    def epoch_metrics(self, m: nn.Module) -> dict[str, float]:
        bits = frac_scheme(m)
        weights = [v for k, v in bits.items() if not k.endswith(".act")]
        now = self.cost().item()
        return {
            "cost": now,
            "cost_rel_error": now / self.target - 1,
            "mean_w_bits": sum(weights) / len(weights),
            **{f"bits/{k}": v for k, v in bits.items()},
        }

    def hooks(self, job: Training) -> Hooks:
        return Hooks(
            after_backward=self.add_penalty,
            after_step=projection(self.f.project),
            on_epoch_start=lambda epoch, m: self.assign(job, epoch, m),
            epoch_metrics=self.epoch_metrics,
        )

    def final_metrics(self, job: Training, fit: FitResult) -> dict[str, Any]:
        f, final = self.f, job.evaluate()
        achieved = self.cost().item()
        # Judged on the saved model: with `best_epoch: all` (the authors', preset official-bin) the best epoch may be a
        # fractional model from before the hard assignment, at another cost than the assignment's (hard_cost).
        met = abs(achieved / self.target - 1) <= f.tolerance
        return {
            "top1": final["top1"],
            "top5": final["top5"],
            "best_epoch": fit.best.get("epoch"),
            "final_top1": fit.history[-1]["test_top1"],
            "search_epochs": self.search_epochs,
            "cost_kind": f.cost,
            "tolerance": f.tolerance,
            "achieved_cost": achieved,
            "cost_rel_error": achieved / self.target - 1,
            "budget_met": met,
            "selection": "best test top-1 epoch"
            + (" after the hard assignment" if f.best_epoch == "after_freeze" else " of the whole run"),
            **cost_metrics(job.model, job.plan.loaders.info, job.ctx.cfg.data.image_size),
        }


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("fracbits", config, inputs, outputs)
    cfg, f = ctx.cfg, ctx.cfg.fracbits
    search_epochs = f.search_epochs_of(cfg.optim.epochs)
    budget = _read_target_inputs(ctx)
    parent = ctx.read_parent("checkpoint", forms=(Form.FLOAT,))
    a_bits = tuple(f.a_bits) if f.a_bits is not None else activation_range(cfg.model.act_bits)
    changes = {"w_bits": tuple(f.w_bits), "a_bits": a_bits, "granularity": f.granularity, "blend": f.blend}
    policy = qat_policy(cfg.qat, cfg.model.act_bits, **changes)
    loaders = ctx.loaders()
    shape = input_size(loaders.info, cfg.data.image_size)
    # The target is known before the run opens, so it can label it.
    model = qat_model(parent, policy, shape, ctx.inputs["checkpoint"])
    probe = CostModel(model, shape, f.cost)
    target = f.target if budget is None else target_from_budget(budget, f.match, probe)
    uniform_bits = probe.uniform_bits_for(target)
    init = f.init_bits if f.init_bits is not None else uniform_bits + 0.5
    _init_bits_(model, init)
    schedule = _Schedule(f, search_epochs, target, shape)
    plan = TrainingPlan(
        parent=parent,
        loaders=loaders,
        model=model,
        model_args=qat_model_args(parent),
        policy=policy.to_dict(),
        method="fracbits",
        labels=_labels(f, target, budget),
        prepare=schedule.prepare,
        evaluate_start=False,
        start_metrics=lambda job, _: {
            "target": target,
            "uniform_equivalent_bits": uniform_bits,
            "init_bits": init,
            "initial_cost": schedule.cost().item(),
        },
        hooks=schedule.hooks,
        keep_best=True,
        best_after=f.best_after_of(search_epochs),
        lr_per_step=f.lr_step == "iteration",
        final_metrics=schedule.final_metrics,
        outputs=lambda job, metrics: job.artifacts.write_json("scheme", frac_scheme(job.model)),
    )
    return run_training(ctx, plan)

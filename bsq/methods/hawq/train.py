"""HAWQ-V3-style allocation (Yao, Dong et al., ICML 2021; methods-next.md "HAWQ-V3") as one stage:

1. Hessian traces: Tr(H_l) of every searched layer's weights by Hutchinson's estimator (bsq.quant.hessian) on
   `hawq.hessian_batches` training batches, on the float parent in eval mode (BN statistics frozen). From the float
   model as HAWQ-V3's ILP.ipynb: its traces are fixed numbers next to ||W_fp32 - W_int8||^2 of the FP ResNet-18
   (so of the float weights: our reading; the Hessian code itself is not in Zhen-Dong/HAWQ);
2. sensitivity Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2 for each candidate b (sensitivity.py);
3. an ILP (ilp.py, scipy.optimize.milp) choosing one candidate per searched layer, minimising sum Omega under the
   size (MB) and / or BitOPs (G) budget, costs measured with the suite's accountant on the model that is trained
   (FracBits' CostModel: the same numbers bsq.metrics and the evaluate stage report);
4. QAT with that scheme fixed: uniform QAT's model (DoReFa weights, PACT inputs, first conv and last linear at
   qat.fixed_bits, FRAC form with hard per-layer bits), uniform QAT's recipe, the best test epoch kept.

The target is `hawq.target` or a BSQ run's measured cost (the `budget` input, matched by `hawq.match`), as FracBits.
An explicit target below the floor (every searched layer at its cheapest candidate) is an error; a matched one runs
at the floor (`target_used`, `budget_reachable: false`, `budget_floor`) and budget_met judges the requested cost.
Outputs: the checkpoint (FRAC form), scheme.json, metrics.json (target, ILP objective / status / time, predicted and
achieved cost, budget_met, `trace/<layer>`), and hessian.json beside metrics.json (traces, Omega, the ILP).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bsq.budgets import MatchedTarget, budget_labels, clamp_matched, read_budget
from bsq.checkpoint import Form, load_model
from bsq.engine import FitResult
from bsq.errors import BSQError
from bsq.methods.hawq.config import HAWQConfig, matched_cost
from bsq.methods.hawq.ilp import Allocation, Budget, CostTable, allocate, cheapest_cost
from bsq.methods.hawq.sensitivity import sensitivities
from bsq.quant.convert import is_shortcut
from bsq.quant.frac import FracLayer, frac_layers, frac_scheme
from bsq.quant.frac_cost import CostModel, target_from_budget
from bsq.quant.hessian import HessianTrace, hutchinson_traces
from bsq.quant.qat import FLOAT_ACTIVATIONS, qat_model, qat_model_args, qat_policy
from bsq.stages.artifacts import write_json
from bsq.stages.context import RunContext, open_context
from bsq.stages.measure import cost_metrics, input_size
from bsq.stages.skeleton import Training, TrainingPlan, run_training

log = logging.getLogger("bsq")

ACHIEVED_KEYS = {"size": "size_mb", "bitops": "bitops_g"}  # evaluate's metric of each cost (default BitOPs policy)


def _read_budget(ctx: RunContext) -> dict[str, Any] | None:
    """The budget input (a BSQ run's metrics.json), or None when `hawq.target` gives the target."""
    h = ctx.cfg.hawq
    if "budget" not in ctx.inputs:
        if h.target is None:
            raise BSQError(
                "HAWQ needs a target: set hawq.target (MB for hawq.cost: size, G for bitops) or give a budget input, "
                "the metrics.json of a BSQ run (--budget PATH), to compare at equal cost"
            )
        return None
    if h.target is not None:
        raise BSQError("give either hawq.target or a budget input, not both")
    if h.cost != matched_cost(h.match):
        raise BSQError(f"hawq.match: {h.match} needs hawq.cost: {matched_cost(h.match)}, got {h.cost}")
    return read_budget(ctx.inputs["budget"], "HAWQ")


def searched_layers(model: nn.Module) -> dict[str, FracLayer]:
    """The layers the ILP chooses bits for: every FracBits layer but the first and the last (fixed at
    qat.fixed_bits, as HAWQ-V3's 8-bit first and last layers; ILP.ipynb leaves them out of the program)."""
    layers = list(frac_layers(model))
    return dict(layers[1:-1])


def shortcut_ties(names: list[str]) -> list[tuple[str, str]]:
    """(shortcut conv, its block's conv1): ILP.ipynb gives a downsampling shortcut the bits of the main stream
    (`x4 == x6`, ...), the conv that reads the same input."""
    ties = []
    for name in names:
        if is_shortcut(name):
            block = name.split(".downsample")[0]
            if f"{block}.conv1" in names:
                ties.append((name, f"{block}.conv1"))
    return ties


@torch.no_grad()
def _set_bits_(layers: Mapping[str, FracLayer], bits: Mapping[str, int]) -> None:
    """Each layer's weights at its bits; its input too where its input range allows them (hawq.activations:
    same; with a fixed input range the clamp keeps model.act_bits)."""
    for name, b in bits.items():
        layer = layers[name]
        layer.wbits.fill_(float(b))
        if layer.a_range is not None:
            layer.abits.fill_(float(b))
        layer.set_hard_()


def cost_table(cost: CostModel, layers: Mapping[str, FracLayer], candidates: list[int]) -> CostTable:
    """The cost as constant + per-layer terms, each measured with the accountant: the constant with every searched
    layer at the lowest candidate, a term as the change of one layer from there (costs add up over layers)."""
    low = {name: candidates[0] for name in layers}
    _set_bits_(layers, low)
    base = float(cost())
    per_layer: dict[str, dict[int, float]] = {}
    for name in layers:
        row = {}
        for b in candidates:
            _set_bits_(layers, {name: b})
            row[b] = float(cost()) - base
        _set_bits_(layers, {name: candidates[0]})
        per_layer[name] = row
    return CostTable(cost.kind, base, per_layer)


def hessian_traces(parent: Mapping[str, Any], names: list[str], ctx: RunContext, loader) -> dict[str, HessianTrace]:
    """Tr(H_l) of the float parent (float ReLUs, eval mode) for the weights of `names`, on the first
    `hawq.hessian_batches` training batches."""
    h = ctx.cfg.hawq
    model = load_model(dict(parent), FLOAT_ACTIVATIONS, ctx.inputs["checkpoint"]).to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = {name: model.get_submodule(name).weight.requires_grad_(True) for name in names}

    def loss_of(batch) -> torch.Tensor:
        x, y = batch[0].to(ctx.device), batch[1].to(ctx.device)
        return F.cross_entropy(model(x), y)

    batches = list(itertools.islice(iter(loader), h.hessian_batches))
    if len(batches) < h.hessian_batches:
        log.warning("HAWQ: the training set has %d batches, fewer than hawq.hessian_batches", len(batches))
    return hutchinson_traces(
        loss_of,
        batches,
        params,
        max_samples=h.samples,
        min_samples=min(h.min_samples, h.samples),
        rel_tol=h.rel_tol,
        seed=ctx.cfg.seed,
    )


def per_param(traces: Mapping[str, HessianTrace], negative: str) -> dict[str, float]:
    """Tr(H_l) / n_l of each layer; a negative estimate is raised to the smallest positive one of the model
    (`hawq.negative_traces: floor`; 0 when none is positive) or kept as estimated (`keep`)."""
    values = {name: t.per_param for name, t in traces.items()}
    below = sorted(name for name, v in values.items() if v < 0)
    if not below or negative == "keep":
        return values
    positive = [v for v in values.values() if v > 0]
    floor = min(positive) if positive else 0.0
    log.warning("HAWQ: negative Hessian trace estimates for %s, raised to %.4g", ", ".join(below), floor)
    return {name: max(v, floor) for name, v in values.items()}


def _labels(h: HAWQConfig, target: float, budget: Mapping[str, Any] | None) -> dict[str, Any]:
    labels = {"target": f"{target:.6g}", "cost": h.cost}
    labels.update(budget_labels(budget, h.match))
    return labels


def _search_metrics(
    h: HAWQConfig,
    target: MatchedTarget,
    budgets: list[Budget],
    allocation: Allocation,
    traces: Mapping[str, HessianTrace],
) -> dict[str, Any]:
    """What the stage knows before training: the target (requested, and where unreachable the one used), the ILP
    and the traces (logged at step 0)."""
    return {
        "target": target.requested,
        **target.metrics(),
        "cost_kind": h.cost,
        "candidates": list(h.candidates),
        **allocation.as_metrics(),
        "predicted_cost": allocation.costs[h.cost],
        **{f"limit_{b.kind}": b.limit for b in budgets},
        "ilp_layers": len(allocation.bits),
        "hessian_samples": max(t.samples for t in traces.values()),
        "hessian_converged": all(t.converged for t in traces.values()),
        "negative_traces": sum(t.trace < 0 for t in traces.values()),
        **{f"trace/{name}": t.trace for name, t in traces.items()},
    }


def _final_metrics(
    job: Training, fit: FitResult, h: HAWQConfig, budgets: list[Budget], target: float
) -> dict[str, Any]:
    """The finetuned model's accuracy and its cost as evaluate counts it; budget_met: no budget exceeded by more
    than `hawq.tolerance` (the ILP keeps every cost at or under its limit), the target judged as requested (a
    matched budget below the floor, run at the floor, misses)."""
    final = job.evaluate()
    costs = cost_metrics(job.model, job.plan.loaders.info, job.ctx.cfg.data.image_size)
    achieved = {b.kind: float(costs[ACHIEVED_KEYS[b.kind]]) for b in budgets}
    limits = {b.kind: target if b.kind == h.cost else b.limit for b in budgets}
    return {
        "top1": final["top1"],
        "top5": final["top5"],
        "best_epoch": fit.best.get("epoch"),
        "final_top1": fit.history[-1]["test_top1"],
        "achieved_cost": achieved[h.cost],
        "cost_rel_error": achieved[h.cost] / target - 1,
        **{f"achieved_{kind}": value for kind, value in achieved.items()},
        "tolerance": h.tolerance,
        "budget_met": all(achieved[kind] <= limit * (1 + h.tolerance) for kind, limit in limits.items()),
        "selection": "best test top-1 epoch (as uniform QAT)",
        **costs,
    }


def _hessian_record(h: HAWQConfig, search: _Search) -> dict:
    """hessian.json: the estimator's settings, per layer its trace record, Omega and bits, and the ILP."""
    traces, omega, allocation = search.traces, search.omega, search.allocation
    return {
        "settings": {
            "hessian_batches": h.hessian_batches,
            "samples": h.samples,
            "min_samples": min(h.min_samples, h.samples),
            "rel_tol": h.rel_tol,
            "quantizer": h.quantizer,
            "activations": h.activations,
            "negative_traces": h.negative_traces,
            "candidates": list(h.candidates),
        },
        "layers": {
            name: {**t.as_dict(), "omega": {str(b): v for b, v in omega[name].items()}, "bits": allocation.bits[name]}
            for name, t in traces.items()
        },
        "ilp": {
            **allocation.as_metrics(),
            "bits": allocation.bits,
            "budgets": [{"kind": b.kind, "limit": b.limit, "key": b.key} for b in search.budgets],
            "ties": [list(t) for t in search.ties],
        },
    }


def _write_hessian(job: Training, record: dict) -> None:
    """hessian.json, the stage's `hessian` output (attached to the MLflow run with the other run artifacts)."""
    if job.artifacts.writes:
        write_json(job.ctx.outputs["hessian"], record)


@dataclass(frozen=True)
class _Search:
    """Steps 1-3, done before the run opens (a bad budget fails without a FAILED run): the target, the budgets,
    the traces, Omega and the allocation, the model set to it."""

    target: MatchedTarget
    budgets: list[Budget]
    traces: dict[str, HessianTrace]
    omega: dict[str, dict[int, float]]
    allocation: Allocation
    ties: list[tuple[str, str]]


def _from_rank_zero(ctx: RunContext, value: Any) -> Any:
    """Rank 0's value on every rank: under torchrun each rank's training shard gives other Hessian batches, and
    every rank must train the same scheme."""
    if ctx.dist.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _target(h: HAWQConfig, budget: Mapping[str, Any] | None, cost: CostModel, table: CostTable) -> MatchedTarget:
    """hawq.target as given (below the floor the ILP raises: the user's number, the message names the floor), or
    the budget's cost raised to the floor (every searched layer at its cheapest candidate) when below it: a BSQ
    run's cost the candidates cannot reach runs at the floor and reports the miss instead of failing the workflow."""
    floor = cheapest_cost(table)
    if budget is None:
        return MatchedTarget(h.target, h.target, floor)
    return clamp_matched(target_from_budget(dict(budget), h.match, cost), floor, None, table.unit, "HAWQ")


def _search(ctx: RunContext, parent, model: nn.Module, shape, budget, loader) -> _Search:
    h = ctx.cfg.hawq
    layers = searched_layers(model)
    costs = {kind: CostModel(model, shape, kind) for kind in h.limits(1.0)}
    tables = {kind: cost_table(cost, layers, h.candidates) for kind, cost in costs.items()}
    target = _target(h, budget, costs[h.cost], tables[h.cost])
    budgets = [Budget(kind, limit, key) for kind, (limit, key) in h.limits(target.used).items()]
    traces = hessian_traces(parent, list(layers), ctx, loader)
    weights = {name: layer.weight for name, layer in layers.items()}  # the parent's float weights
    omega = sensitivities(per_param(traces, h.negative_traces), weights, h.candidates, h.quantizer)
    ties = shortcut_ties(list(layers)) if h.tie_shortcuts else []
    allocation = allocate(omega, tables, budgets, ties, h.time_limit)
    traces, omega, allocation = _from_rank_zero(ctx, (traces, omega, allocation))
    _set_bits_(layers, allocation.bits)
    for kind, cost in costs.items():  # the ILP's cost is the accountant's
        if abs(float(cost()) - allocation.costs[kind]) > 1e-6 * max(1.0, abs(allocation.costs[kind])):
            raise AssertionError(f"ILP {kind} {allocation.costs[kind]} differs from the model's {float(cost())}")
    log.info("HAWQ allocation (%s, objective %.4g): %s", allocation.status, allocation.objective, allocation.bits)
    return _Search(target, budgets, traces, omega, allocation, ties)


def _outputs(job: Training, search: _Search) -> None:
    job.artifacts.write_json("scheme", frac_scheme(job.model))
    _write_hessian(job, _hessian_record(job.ctx.cfg.hawq, search))


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("hawq", config, inputs, outputs)
    cfg, h = ctx.cfg, ctx.cfg.hawq
    budget = _read_budget(ctx)
    parent = ctx.read_parent("checkpoint", forms=(Form.FLOAT,))
    lo, hi = h.candidates[0], h.candidates[-1]
    a_bits = {"a_bits": (lo, hi)} if h.activations == "same" else {}  # else model.act_bits (qat_policy)
    policy = qat_policy(cfg.qat, cfg.model.act_bits, w_bits=(lo, hi), hard=True, init_bits=float(hi), **a_bits)
    loaders = ctx.loaders()
    shape = input_size(loaders.info, cfg.data.image_size)
    model = qat_model(parent, policy, shape, ctx.inputs["checkpoint"])
    search = _search(ctx, parent, model, shape, budget, loaders.train)
    metrics = _search_metrics(h, search.target, search.budgets, search.allocation, search.traces)
    plan = TrainingPlan(
        parent=parent,
        loaders=loaders,
        model=model,
        model_args=qat_model_args(parent),
        policy=policy.to_dict(),
        method="hawq",
        labels=_labels(h, search.target.requested, budget),
        start_metrics=lambda job, start: {**metrics, "initial_top1": start["top1"]},
        keep_best=True,
        final_metrics=lambda job, fit: _final_metrics(job, fit, h, search.budgets, search.target.requested),
        outputs=lambda job, _: _outputs(job, search),
    )
    return run_training(ctx, plan)

"""CSQ (Xiao et al., DAC 2023) as one stage (methods-next.md CSQ; lawsonX/CSQ main_cifar.py, dist_img_cs.py):

1. the float parent (its activations as `model.act_bits`: ReLU6 + max-scaled quantizer > 3 bits, PACT <= 3, the
   BSQ model) gets CSQ layers at `csq.nbits` on the layers BSQ's policy quantizes (first conv and fc quantized,
   1x1 shortcuts float and uncounted), planes initialised from its weights as BSQ's;
2. soft phase: planes and gates relaxed by sigmoid(beta x), beta rising per epoch to `csq.final_temp` at the
   ticket; loss = CE + the budget-aware term pulling the open-gate share to `csq.target / N`;
3. at `csq.ticket` the gates harden (1[s > 0], no longer trained); training continues with beta still growing
   (rounds > 1: gate resets between soft rounds, planes rewound at the ticket, a fresh optimizer);
4. the final epoch's model is hardened (planes 1[p > 0], 1[n > 0]) and exported to BSQ's BitConv2d / BitLinear
   (Form.BITS), so evaluate, tables and plots read it unchanged.

The target is `csq.target` (average bits) or a measured budget (the `budget` input, a BSQ run's metrics.json, read
via `csq.match`). metrics.json has the accountant's bits of the exported model (avg_bits, compression, ...) and
CSQ's own count N R1 (`csq_avg_bits`), `target`, `achieved_cost` (accountant average bits), `budget_met`.
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
from bsq.methods.csq.budget import budget_penalty, gate_share, open_gates, target_from_budget
from bsq.methods.csq.config import CSQConfig, CSQSchedule
from bsq.methods.csq.layers import csq_layers, csq_quantize_model, export_, set_state_
from bsq.quant.convert import QuantPolicy, export_scheme
from bsq.stages.context import RunContext, open_context
from bsq.stages.measure import cost_metrics
from bsq.stages.skeleton import Training, TrainingPlan, run_training

log = logging.getLogger("bsq")


def _read_budget(ctx: RunContext, c: CSQConfig) -> dict[str, Any] | None:
    budget = read_budget(ctx.inputs["budget"], "CSQ") if "budget" in ctx.inputs else None
    if budget is not None and c.target is not None:
        raise BSQError("give either csq.target or a budget input, not both")
    if budget is None and c.target is None:
        raise BSQError(
            "CSQ needs a target: set csq.target (average weight bits) or give a budget input, the metrics.json of a "
            "BSQ run (--budget PATH), to compare at equal cost"
        )
    return budget


@torch.no_grad()
def _snapshot_(model: nn.Module) -> None:
    for _, layer in csq_layers(model):
        layer.rewind_pweight.copy_(layer.pweight)
        layer.rewind_nweight.copy_(layer.nweight)


@torch.no_grad()
def _rewind_(model: nn.Module) -> None:
    for _, layer in csq_layers(model):
        layer.pweight.copy_(layer.rewind_pweight)
        layer.nweight.copy_(layer.rewind_nweight)


@torch.no_grad()
def _reset_gates_(model: nn.Module, beta: float, s0: float) -> None:
    """Continuous sparsification's reset between rounds: s <- min(beta s, s0). (The released dist_img_cs.py sets
    model.temp = 1 on the DDP wrapper before model.prune(), so its inner model's temperature never changes: the
    reset there is min(s, s0) and the soft rounds run at beta 1; we set beta on the layers themselves.)"""
    for _, layer in csq_layers(model):
        layer.gate.copy_(torch.clamp(beta * layer.gate, max=s0))


class _Schedule:
    """CSQ's epoch schedule around the shared skeleton: beta and the gate phase at each epoch start, the budget
    term after each backward, and the export of the exact model at the end."""

    def __init__(self, c: CSQConfig, sched: CSQSchedule, target: float) -> None:
        self.c, self.sched, self.target = c, sched, target
        self.own: dict[str, Any] = {}

    def prepare(self, job: Training) -> None:
        set_state_(job.model, self.sched.beta(0), self.sched.hard(0))

    def on_epoch_start(self, epoch: int, m: nn.Module) -> tuple[dict[str, float], EpochAction | None]:
        s, action = self.sched, None
        if s.snapshots(epoch):
            _snapshot_(m)
        if s.resets_gates(epoch):
            _reset_gates_(m, s.final_temp, self.c.gate_init)
        if s.rewinds(epoch):
            _rewind_(m)
            action = EpochAction.RESET  # dist_img_cs.py: a fresh SGD for the final (hard) round
        if set_state_(m, s.beta(epoch), s.hard(epoch)) and action is None:
            action = EpochAction.REWRAP  # the gates stop (or, on resume, start) training
        return {"beta": s.beta(epoch), "hard_gates": float(s.hard(epoch))}, action

    def add_penalty(self, m: nn.Module) -> torch.Tensor | None:
        if any(layer.hard_gates for _, layer in csq_layers(m)):
            return None  # hard gates: the term has no gradient left (the authors still add the constant)
        value, _ = budget_penalty(m, self.c.lmbda, self.target, self.c.share)
        value.backward()
        return value.detach()

    def epoch_metrics(self, m: nn.Module) -> dict[str, float]:
        r1 = gate_share(m, self.c.share)
        out = {"gate_share": r1, "csq_avg_bits": self.c.nbits * r1}
        out.update({f"open_gates/{name}": float(open_gates(layer)) for name, layer in csq_layers(m)})
        return out

    def export(self, job: Training) -> None:
        """Record CSQ's own count, then harden and swap every CSQ layer for its BSQ bit layer."""
        m = job.model
        layers = list(csq_layers(m))
        if not layers:
            return  # already exported
        set_state_(m, layers[0][1].beta, True, hard_planes=True)
        r1 = gate_share(m, self.c.share)
        self.own = {
            "gate_share": r1,
            "csq_avg_bits": self.c.nbits * r1,
            "gates": {name: [int(g > 0) for g in layer.gate.tolist()] for name, layer in layers},
        }
        export_(m, self.c.compact)

    def final_metrics(self, job: Training, fit: FitResult) -> dict[str, Any]:
        c, final = self.c, job.evaluate()
        costs = cost_metrics(job.model, job.plan.loaders.info, job.ctx.cfg.data.image_size)
        achieved = costs["avg_bits"]
        last = fit.history[-1] if fit.history else {}
        return {
            "top1": final["top1"],
            "top5": final["top5"],
            "soft_top1": last.get("test_top1"),  # the last epoch's model with sigmoid planes (the authors' number)
            "target": self.target,
            "cost_kind": "avg_bits",
            "achieved_cost": achieved,
            "tolerance": c.tolerance,
            "budget_met": abs(achieved / self.target - 1) <= c.tolerance,
            "csq_budget_met": abs(self.own["csq_avg_bits"] / self.target - 1) <= c.tolerance,
            "ticket": self.sched.ticket,
            "rounds": self.sched.rounds,
            "share": c.share,
            **self.own,
            **costs,
        }


def _labels(target: float, c: CSQConfig, budget: dict[str, Any] | None) -> dict[str, Any]:
    labels: dict[str, Any] = {"target": f"{target:.6g}"}
    labels.update(budget_labels(budget, c.match))
    return labels


def csq_policy(ctx: RunContext) -> dict[str, Any]:
    """What the checkpoints record as `policy`: BSQ's QuantPolicy at csq.nbits (the exported model is BSQ's)."""
    return {**ctx.bit_policy(), "nbits": ctx.cfg.csq.nbits}


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("csq", config, inputs, outputs)
    cfg, c = ctx.cfg, ctx.cfg.csq
    sched = c.schedule(cfg.optim.epochs)
    budget = _read_budget(ctx, c)
    parent = ctx.read_parent("checkpoint", forms=(Form.FLOAT,))
    loaders = ctx.loaders()
    model = load_model(parent, ctx.activation_overrides(), ctx.inputs["checkpoint"])
    policy = csq_policy(ctx)
    csq_quantize_model(model, QuantPolicy(**policy), None, c.plane_init, c.gate_init, rewindable=c.rounds > 1)
    if not any(True for _ in csq_layers(model)):
        raise BSQError("the quantization policy leaves no layer to CSQ: check quant.quantize_first/last")
    target = c.target if budget is None else target_from_budget(budget, c.match, model)
    schedule = _Schedule(c, sched, target)
    plan = TrainingPlan(
        parent=parent,
        loaders=loaders,
        model=model,
        model_args={**parent["model"], **ctx.activation_overrides()},
        policy=policy,
        method="csq",
        labels=_labels(target, c, budget),
        prepare=schedule.prepare,
        start_metrics=lambda job, start: {
            "target": target,
            "initial_csq_avg_bits": c.nbits * gate_share(job.model, c.share),
            **({"initial_top1": start["top1"]} if start else {}),
        },
        hooks=lambda job: Hooks(
            after_backward=schedule.add_penalty,
            on_epoch_start=schedule.on_epoch_start,
            epoch_metrics=schedule.epoch_metrics,
        ),
        final_metrics=schedule.final_metrics,
        outputs=lambda job, metrics: job.artifacts.write_json("scheme", export_scheme(job.model)),
        export=schedule.export,
    )
    return run_training(ctx, plan)

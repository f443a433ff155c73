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

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from bsq.checkpoint import load_model
from bsq.engine import Hooks, evaluate
from bsq.errors import BSQError
from bsq.fracbits import CostModel, hard_assign, penalty, target_from_budget
from bsq.quant.frac import (
    FracPolicy,
    clamp_frac_bits_,
    frac_layers,
    frac_quantize_model,
    frac_scheme,
    mark_signed_inputs_,
)
from bsq.stages.common import Session, write_json
from bsq.stages.measure import cost_metrics, input_size

log = logging.getLogger("bsq")
FLOAT_ACTIVATIONS = {"act_bits": None, "stem_act_bits": None}  # the layers quantize their own inputs


def activation_range(s: Session) -> tuple[int, int] | None:
    """model.act_bits as a fixed input-activation range ([a, a]); None (or >= 32) = unquantized activations."""
    bits = s.cfg.model.act_bits
    return None if bits is None or bits >= 32 else (bits, bits)


def policy_of(s: Session, **changes: Any) -> FracPolicy:
    """The quantization policy of this job's config (qat section), with stage-specific `changes`."""
    q = s.cfg.qat
    base = {
        "a_bits": activation_range(s),
        "fixed_bits": q.fixed_bits,
        "quantize_shortcuts": q.quantize_shortcuts,
        "variant": q.variant,
    }
    return FracPolicy(**{**base, **changes})


def frac_model(s: Session, parent: dict[str, Any], policy: FracPolicy) -> nn.Module:
    """The float parent with float ReLUs, its conv / linear layers swapped for FracBits layers."""
    model = load_model(parent, FLOAT_ACTIVATIONS, s.inputs["checkpoint"])
    frac_quantize_model(model, policy)
    mark_signed_inputs_(model, input_size(s.dataset(), s.cfg.data.image_size))
    return model


def start(s: Session) -> dict[str, Any]:
    """Common start of the FracBits and uniform stages: the float parent and this job's model arguments."""
    parent = s.read_parent("checkpoint", forms=("float",))
    s.model_args = {**parent["model"], **FLOAT_ACTIVATIONS}
    return parent


def _read_budget(path) -> dict[str, Any]:
    try:
        budget = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BSQError(f"cannot read the FracBits budget {path}: {exc}. Give a BSQ run's metrics.json.") from exc
    if not isinstance(budget, dict):
        raise BSQError(f"{path} is not a metrics.json (a JSON object of metrics)")
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


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    s = Session("fracbits", config, inputs, outputs, required_inputs=("checkpoint",), optional_inputs=("budget",))
    cfg, f = s.cfg, s.cfg.fracbits
    search_epochs = f.search_epochs_of(cfg.optim.epochs)
    budget = _read_budget(s.inputs["budget"]) if "budget" in s.inputs else None
    if budget is not None and f.target is not None:
        raise BSQError("give either fracbits.target or a budget input, not both")
    if budget is None and f.target is None:
        raise BSQError(
            "FracBits needs a target: set fracbits.target (MB for cost: size, G for cost: bitops) or give a budget "
            "input, the metrics.json of a BSQ run (--budget PATH) to compare at equal cost"
        )
    parent = start(s)
    a_bits = tuple(f.a_bits) if f.a_bits is not None else activation_range(s)
    policy = policy_of(s, w_bits=tuple(f.w_bits), a_bits=a_bits, granularity=f.granularity, blend=f.blend)
    s.policy = policy.to_dict()
    loaders = s.loaders()
    shape = input_size(loaders.info, cfg.data.image_size)
    # The target is known before the run opens, so it can label it.
    probe = frac_model(s, parent, policy)
    cost = CostModel(probe, shape, f.cost)
    target = f.target if budget is None else target_from_budget(budget, f.match, cost)
    uniform_bits = cost.uniform_bits_for(target)
    init = f.init_bits if f.init_bits is not None else uniform_bits + 0.5
    labels = {"method": "fracbits", "target": f"{target:.6g}", "cost": f.cost}
    if budget is not None:
        labels.update(budget_of=budget.get("labels", {}).get("method", "bsq"), match=f.match)
        if "alpha" in budget.get("labels", {}):
            labels["alpha"] = budget["labels"]["alpha"]
    with s.open_run(parent, **labels) as tracker:
        if s.resume:
            model = load_model(s.resume, path=s.resume_path)
        else:
            model = probe
            _init_bits_(model, init)
        model.to(s.device)
        cost = CostModel(model, shape, f.cost)
        if not s.resume:
            s.start_metrics.update(
                target=target, uniform_equivalent_bits=uniform_bits, init_bits=init, initial_cost=cost().item()
            )
            tracker.log_metrics(s.start_metrics, step=0)

        def searching(m: nn.Module) -> bool:
            return not any(layer.is_hard for _, layer in frac_layers(m))

        def add_penalty(m: nn.Module) -> torch.Tensor | None:
            if not searching(m):
                return None  # the penalty is off after the hard assignment
            value = penalty(cost(), target, f.kappa, f.normalize)
            value.backward()
            return value.detach()

        def assign(epoch: int, m: nn.Module) -> tuple[dict[str, float], str | None]:
            if epoch != search_epochs or not searching(m):
                return {}, None
            result = hard_assign(m, cost, target, f.tolerance, f.bisection_trials, f.bisection)
            record = result.as_metrics(f.tolerance)
            if not record["budget_met"]:
                log.warning(
                    "FracBits hard assignment: the closest policy costs %.4g %s, %+.1f %% off the target %.4g",
                    result.cost,
                    cost.unit,
                    100 * result.relative_error,
                    target,
                )
            after = evaluate(m, loaders.test, s.device, s.progress)
            s.start_metrics.update(record, top1_before_ft=after["top1"], top5_before_ft=after["top5"])
            return {**record, "hard_top1": after["top1"]}, "rewrap"

        def epoch_metrics(m: nn.Module) -> dict[str, float]:
            bits = frac_scheme(m)
            weights = [v for k, v in bits.items() if not k.endswith(".act")]
            now = cost().item()
            return {
                "cost": now,
                "cost_rel_error": now / target - 1,
                "mean_w_bits": sum(weights) / len(weights),
                **{f"bits/{k}": v for k, v in bits.items()},
            }

        hooks = Hooks(
            after_backward=add_penalty,
            after_step=projection(f.project),
            on_epoch_start=assign,
            epoch_metrics=epoch_metrics,
        )
        trainer = s.trainer(
            model,
            loaders,
            tracker,
            hooks,
            keep_best=True,
            best_after=f.best_after_of(search_epochs),
            lr_per_step=f.lr_step == "iteration",
        )
        result = trainer.fit()
        model.load_state_dict(result.best_state)
        final = evaluate(model, loaders.test, s.device, s.progress)
        last = result.history[-1]
        metrics: dict[str, Any] = {
            **s.start_metrics,
            "top1": final["top1"],
            "top5": final["top5"],
            "best_epoch": result.best.get("epoch"),
            "final_top1": last["test_top1"],
            "search_epochs": search_epochs,
            "cost_kind": f.cost,
            "tolerance": f.tolerance,
            "achieved_cost": cost().item(),
            "selection": "best test top-1 epoch"
            + (" after the hard assignment" if f.best_epoch == "after_freeze" else " of the whole run"),
            **cost_metrics(model, loaders.info, cfg.data.image_size),
        }
        write_json(s.outputs["scheme"], frac_scheme(model))
        s.save_model("checkpoint", model, metrics, epoch=cfg.optim.epochs)
        return s.finish(metrics, result.history)

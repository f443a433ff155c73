"""BSQ search (spec §2-3, §8.1): the float model converted to N-bit planes is trained with CE + alpha R/TP; every
`requant_interval` epochs (from epoch 0) the planes are re-quantized and sparse MSB/LSB planes dropped, and the
optimizer is rebuilt (spec §3.0, P9). Each epoch logs what a re-quantization would give (`bits/<layer>`,
bit sparsity). The output is the final epoch's relaxed planes: the prune stage does the last re-quantization
(spec §3.3, P13).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from bsq.checkpoint import Form, load_model
from bsq.engine import EpochAction, FitResult, Hooks, evaluate
from bsq.errors import BSQError
from bsq.methods.base import format_number
from bsq.metrics import projected_bits, summary
from bsq.quant.convert import bit_layers, clamp_search_, quantize_model, requantize_model, set_form_
from bsq.regularizers import add_penalty_grad_, bit_penalty
from bsq.stages.context import RunContext, open_context
from bsq.stages.skeleton import Training, TrainingPlan, run_training


def _bit_model(ctx: RunContext, parent: dict[str, Any]) -> nn.Module:
    """The float parent converted to `quant.nbits` planes (or a bit-form parent as is), then `pruning(0)` as the
    official script does once after loading (spec §3.0)."""
    model = load_model(parent, ctx.activation_overrides(), ctx.inputs["checkpoint"])
    if parent["form"] == Form.FLOAT:
        quantize_model(model, ctx.cfg.quant.policy())
    set_form_(model, "bits")
    for _, layer in bit_layers(model):
        layer.prune_(0.0)
    return model


class DegenerateScheme(BSQError):
    """Every quantized layer ended at 0 bits: the model computes a constant, so no table row can use it."""


def check_not_degenerate(scheme: dict[str, int], alpha: str | float | None, where: str) -> None:
    """Stop a search whose penalty zeroed every layer (e.g. alpha 1e30), instead of reporting infinite
    compression at chance accuracy."""
    weights = [bits for name, bits in scheme.items() if not name.endswith(".bias")]
    if weights and not any(weights):
        strength = f"bsq.alpha={alpha}" if alpha is not None else "the search's alpha"
        raise DegenerateScheme(
            f"every quantized layer is at 0 bits {where}: {strength} is so strong that the model computes a "
            "constant (compression inf, chance accuracy). Use a smaller alpha (e.g. a tenth of it)."
        )


def _hooks(job: Training) -> Hooks:
    """The penalty gradient after backward, the plane clamp after each step, the periodic re-quantization."""
    cfg = job.ctx.cfg
    b = cfg.bsq

    def requantize(epoch: int, m: nn.Module) -> tuple[dict[str, float], EpochAction | None]:
        if epoch % b.requant_interval:
            return {}, None
        history = job.trainer.history
        before = history[-1]["test_top1"] if history else job.start_metrics["initial_top1"]
        scheme = requantize_model(m, cfg.quant.maxbit, b.threshold, b.grows, b.prune_shares)
        check_not_degenerate(scheme, job.run.labels.get("alpha"), f"at the re-quantization of epoch {epoch}")
        after = evaluate(m, job.plan.loaders.test, job.ctx.device, job.ctx.progress)["top1"]
        return {"requant_top1_before": before, "requant_top1_after": after}, EpochAction.RESET

    def epoch_metrics(m: nn.Module) -> dict[str, float]:
        current = summary(m)
        return {
            "avg_bits": current["avg_bits"],
            "compression": current["compression"],
            **projected_bits(m, cfg.quant.maxbit, b.grows),
        }

    return Hooks(
        after_backward=lambda m: add_penalty_grad_(m, b.alpha, b.penalty, b.reweight),
        after_step=lambda m: clamp_search_(m, b.clamp),
        on_epoch_start=requantize,
        epoch_metrics=epoch_metrics,
    )


def _start_metrics(job: Training, start: dict[str, float] | None) -> dict[str, Any]:
    return {"initial_top1": start["top1"], "initial_penalty": bit_penalty(job.model).item()}


def _final_metrics(job: Training, fit: FitResult) -> dict[str, Any]:
    last = fit.history[-1] if fit.history else {}
    return {
        "alpha": job.ctx.cfg.bsq.alpha,
        "final_top1": last.get("test_top1"),
        "best_top1": fit.best.get("test_top1"),
        "best_epoch": fit.best.get("epoch"),
        "final_penalty": last.get("train_penalty"),
        "final_proj_avg_bits": last.get("proj_avg_bits"),
        "final_proj_compression": last.get("proj_compression"),
        "final_bit_sparsity": last.get("bit_sparsity"),
        "epochs": job.ctx.cfg.optim.epochs,
    }


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("search", config, inputs, outputs)
    parent = ctx.read_parent("checkpoint", forms=(Form.FLOAT, Form.BITS))
    loaders = ctx.loaders()
    plan = TrainingPlan(
        parent=parent,
        loaders=loaders,
        model=_bit_model(ctx, parent),  # built (and so validated) before the run opens
        model_args={**parent["model"], **ctx.activation_overrides()},
        policy=parent.get("policy") or ctx.bit_policy(),
        labels={"alpha": format_number(ctx.cfg.bsq.alpha)},  # the config's labels (the workflow's spelling) win
        start_metrics=_start_metrics,
        hooks=_hooks,
        final_metrics=_final_metrics,
    )
    return run_training(ctx, plan)

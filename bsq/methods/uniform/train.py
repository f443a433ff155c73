"""Uniform-precision QAT baseline: every layer at `qat.bits` weight bits (the first conv and the last linear at
`qat.fixed_bits`) with the same quantizers as FracBits (DoReFa weights, PACT input activations at model.act_bits),
trained from the float model with the same recipe. The rows of PACT / DoReFa / LQ-Nets in the papers' tables are
this kind of model; running it here puts it on the same data, model, seed and epochs as BSQ and FracBits.
Activations: model.act_bits by default (what BSQ and FracBits get), or `qat.act_bits` ("same" = WbAb).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.checkpoint import Form
from bsq.engine import FitResult
from bsq.quant.frac import frac_scheme
from bsq.quant.qat import activation_range, qat_model, qat_model_args, qat_policy
from bsq.stages.context import open_context
from bsq.stages.measure import cost_metrics, input_size
from bsq.stages.skeleton import Training, TrainingPlan, run_training


def _final_metrics(job: Training, fit: FitResult) -> dict[str, Any]:
    final = job.evaluate()
    return {
        "top1": final["top1"],
        "top5": final["top5"],
        "best_epoch": fit.best.get("epoch"),
        "final_top1": fit.history[-1]["test_top1"],
        "w_bits": job.ctx.cfg.qat.bits,
        "selection": "best test top-1 epoch (as the authors' scripts)",
        **cost_metrics(job.model, job.plan.loaders.info, job.ctx.cfg.data.image_size),
    }


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("uniform", config, inputs, outputs)
    cfg = ctx.cfg
    parent = ctx.read_parent("checkpoint", forms=(Form.FLOAT,))
    bits, act = cfg.qat.bits, cfg.qat.act_bits
    a_bits = activation_range(cfg.model.act_bits) if act is None else (bits, bits) if act == "same" else (act, act)
    a_bits = None if a_bits is not None and a_bits[0] >= 32 else a_bits
    changes = {"w_bits": (bits, bits), "a_bits": a_bits, "hard": True, "init_bits": float(bits)}
    policy = qat_policy(cfg.qat, cfg.model.act_bits, **changes)
    loaders = ctx.loaders()
    plan = TrainingPlan(
        parent=parent,
        loaders=loaders,
        # built (and so validated) before the run opens
        model=qat_model(parent, policy, input_size(loaders.info, cfg.data.image_size), ctx.inputs["checkpoint"]),
        model_args=qat_model_args(parent),
        policy=policy.to_dict(),
        method="uniform",
        labels={"bits": bits},
        start_metrics=lambda job, start: {"initial_top1": start["top1"]},
        keep_best=True,
        final_metrics=_final_metrics,
        outputs=lambda job, metrics: job.artifacts.write_json("scheme", frac_scheme(job.model)),
    )
    return run_training(ctx, plan)

"""Uniform-precision QAT baseline: every layer at `qat.bits` weight bits (the first conv and the last linear at
`qat.fixed_bits`) with the same quantizers as FracBits (DoReFa weights, PACT input activations at model.act_bits),
trained from the float model with the same recipe. The rows of PACT / DoReFa / LQ-Nets in the papers' tables are
this kind of model; running it here puts it on the same data, model, seed and epochs as BSQ and FracBits.
Activations: model.act_bits by default (what BSQ and FracBits get), or `qat.act_bits` ("same" = WbAb).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.checkpoint import load_model
from bsq.engine import evaluate
from bsq.quant.frac import frac_scheme
from bsq.stages.common import Session, write_json
from bsq.stages.fracbits import activation_range, frac_model, policy_of, start
from bsq.stages.measure import cost_metrics


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    s = Session("uniform", config, inputs, outputs, required_inputs=("checkpoint",))
    cfg = s.cfg
    parent = start(s)
    bits, act = cfg.qat.bits, cfg.qat.act_bits
    a_bits = activation_range(s) if act is None else (bits, bits) if act == "same" else (act, act)
    a_bits = None if a_bits is not None and a_bits[0] >= 32 else a_bits
    policy = policy_of(s, w_bits=(bits, bits), a_bits=a_bits, hard=True, init_bits=float(bits))
    s.policy = policy.to_dict()
    loaders = s.loaders()
    model = frac_model(s, parent, policy)  # built (and so validated) before the run opens
    with s.open_run(parent, method="uniform", bits=bits) as tracker:
        if s.resume:
            model = load_model(s.resume, path=s.resume_path)
        model.to(s.device)
        if not s.resume:
            start_eval = evaluate(model, loaders.test, s.device, s.progress)
            s.start_metrics.update(initial_top1=start_eval["top1"])
            tracker.log_metrics(s.start_metrics, step=0)
        trainer = s.trainer(model, loaders, tracker, keep_best=True)
        result = trainer.fit()
        model.load_state_dict(result.best_state)
        final = evaluate(model, loaders.test, s.device, s.progress)
        metrics: dict[str, Any] = {
            **s.start_metrics,
            "top1": final["top1"],
            "top5": final["top5"],
            "best_epoch": result.best.get("epoch"),
            "final_top1": result.history[-1]["test_top1"],
            "w_bits": bits,
            "selection": "best test top-1 epoch (as the authors' scripts)",
            **cost_metrics(model, loaders.info, cfg.data.image_size),
        }
        write_json(s.outputs["scheme"], frac_scheme(model))
        s.save_model("checkpoint", model, metrics, epoch=cfg.optim.epochs)
        return s.finish(metrics, result.history)

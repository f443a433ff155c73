"""Precision pruning (spec §3.3, P13): the search's final relaxed planes are re-quantized (+1 bit on overflow, up to
`quant.maxbit`) and their all-zero MSB/LSB planes dropped (threshold 0, whatever the search used). The result is
the mixed-precision scheme (`scheme.json`: bits per layer, 0 for all-zero layers) and the pruned bit-form model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.checkpoint import Form, load_model
from bsq.engine import evaluate
from bsq.methods.bsq.search import check_not_degenerate
from bsq.quant.convert import requantize_model
from bsq.stages.artifacts import Artifacts
from bsq.stages.context import open_context
from bsq.stages.lineage import open_run
from bsq.stages.measure import cost_metrics


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("prune", config, inputs, outputs)
    cfg = ctx.cfg
    parent = ctx.read_parent("checkpoint", forms=(Form.BITS,))
    loaders = ctx.loaders()
    model = load_model(parent, path=ctx.inputs["checkpoint"])
    with open_run(ctx, parent) as run:
        model.to(ctx.device)
        before = evaluate(model, loaders.test, ctx.device, ctx.progress)
        scheme = requantize_model(model, cfg.quant.maxbit, 0.0, cfg.bsq.grows)
        check_not_degenerate(scheme, run.labels.get("alpha"), "after the final re-quantization")
        after = evaluate(model, loaders.test, ctx.device, ctx.progress)
        artifacts = Artifacts(ctx, run, parent["model"], parent["policy"])
        artifacts.write_json("scheme", scheme)
        artifacts.write_layers("layers", model)
        run.tracker.log_metrics({f"bits/{name}": bits for name, bits in scheme.items()})
        metrics = {
            "top1_before": before["top1"],
            "top1": after["top1"],
            "top5": after["top5"],
            **cost_metrics(model, loaders.info, cfg.data.image_size),
        }
        artifacts.save_model("checkpoint", model, metrics)
        return artifacts.finish(metrics)

"""Precision pruning (spec §3.3, P13): the search's final relaxed planes are re-quantized (+1 bit on overflow, up to
`quant.maxbit`) and their all-zero MSB/LSB planes dropped (threshold 0, whatever the search used). The result is
the mixed-precision scheme (`scheme.json`: bits per layer, 0 for all-zero layers) and the pruned bit-form model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.checkpoint import load_model
from bsq.engine import evaluate
from bsq.metrics import layer_table
from bsq.quant.convert import requantize_model
from bsq.stages.common import Session, write_json, write_text_atomic
from bsq.stages.measure import cost_metrics
from bsq.stages.search import check_not_degenerate


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    s = Session("prune", config, inputs, outputs, required_inputs=("checkpoint",))
    parent = s.read_parent("checkpoint", forms=("bits",))
    s.model_args, s.policy = parent["model"], parent["policy"]
    loaders = s.loaders()
    model = load_model(parent, path=s.inputs["checkpoint"])
    with s.open_run(parent) as tracker:
        model.to(s.device)
        before = evaluate(model, loaders.test, s.device, s.progress)
        scheme = requantize_model(model, s.cfg.quant.maxbit, 0.0, s.cfg.bsq.overflow == "grow")
        check_not_degenerate(scheme, parent.get("labels", {}).get("alpha"), "after the final re-quantization")
        after = evaluate(model, loaders.test, s.device, s.progress)
        write_json(s.outputs["scheme"], scheme)
        table = layer_table(model)
        table["ones_pct"] = table["ones_pct"].map(lambda z: " ".join(f"{v:g}" for v in z))
        write_text_atomic(s.outputs["layers"], table.to_csv(index=False))
        tracker.log_metrics({f"bits/{name}": bits for name, bits in scheme.items()})
        metrics = {
            "top1_before": before["top1"],
            "top1": after["top1"],
            "top5": after["top5"],
            **cost_metrics(model, loaders.info, s.cfg.data.image_size),
        }
        s.save_model("checkpoint", model, metrics)
        return s.finish(metrics)

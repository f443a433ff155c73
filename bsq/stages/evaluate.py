"""Evaluation of any checkpoint: top-1/top-5 on the test split plus the paper's cost metrics (average bits,
compression, size, BitOPs) -> metrics.json and a per-layer table.

Besides bsq-repro checkpoints (any form), an official checkpoint of the authors' code is accepted: its model is
built from `model.arch` and the dataset, and `weight_bits` (if given) quantizes a float one uniformly, e.g. the
official ResNet-20 at 8 bits under the 4-bit-activation forward (spec P12).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from bsq.checkpoint import ForeignCheckpoint, Form, load_checkpoint, load_model
from bsq.engine import evaluate
from bsq.errors import BSQError
from bsq.official import official_model
from bsq.quant.convert import QuantPolicy, bit_layers, quantize_model
from bsq.stages.artifacts import Artifacts
from bsq.stages.context import RunContext, open_context
from bsq.stages.lineage import open_run
from bsq.stages.measure import cost_metrics


def _official_model(ctx: RunContext, weight_bits: int | None) -> tuple[nn.Module, dict[str, Any], dict | None]:
    """One of the authors' files, built from model.arch and the dataset: (model, model args, policy)."""
    model_args = ctx.cfg.model_args()
    shortcuts = ctx.cfg.quant.quantize_shortcuts
    model = official_model(model_args, ctx.inputs["checkpoint"], ctx.cfg.quant.policy(), who="evaluate")
    if weight_bits is not None:
        if any(True for _ in bit_layers(model)):
            raise BSQError("weight_bits applies to float checkpoints; this official checkpoint is already in bits")
        quantize_model(model, QuantPolicy(nbits=weight_bits, quantize_shortcuts=shortcuts))
    policy = {"quantize_shortcuts": shortcuts} if any(True for _ in bit_layers(model)) else None
    return model, model_args, policy


def run(
    config: Mapping[str, Any] | None,
    inputs: Mapping[str, Any] | None,
    outputs: Mapping[str, Any],
    weight_bits: int | None = None,
) -> dict:
    ctx = open_context("evaluate", config, inputs, outputs)
    path = ctx.inputs["checkpoint"]
    try:
        parent = load_checkpoint(path)
    except ForeignCheckpoint:
        parent = None  # one of the authors' files: built from model.arch and the dataset
    if parent is not None:
        ctx.check_parent(parent)
        if weight_bits is not None:
            raise BSQError("weight_bits is for official float checkpoints; a bsq-repro checkpoint keeps its own bits")
    loaders = ctx.loaders()
    # Built (and so validated) before the run opens: a wrong file leaves no FAILED run behind.
    if parent is None:
        model, model_args, policy = _official_model(ctx, weight_bits)
    else:
        model, model_args, policy = load_model(parent, path=path), parent["model"], parent["policy"]
    source = parent["stage"] if parent else "official"
    with open_run(ctx, parent, labels={"source": "official" if parent is None else None}) as run:
        run.tracker.set_tags({"bsq.checkpoint": str(path), "bsq.checkpoint_stage": source})
        model.to(ctx.device)
        result = evaluate(model, loaders.test, ctx.device, ctx.progress)
        artifacts = Artifacts(ctx, run, model_args, policy)
        artifacts.write_layers("layers", model)
        metrics = {
            "top1": result["top1"],
            "top5": result["top5"],
            "loss": result["loss"],
            "act_bits": model_act_bits(model_args, parent),
            "checkpoint_stage": source,
            **cost_metrics(model, loaders.info, ctx.cfg.data.image_size),
        }
        return artifacts.finish(metrics)


def model_act_bits(model_args: Mapping[str, Any], parent: Mapping[str, Any] | None) -> int | str | None:
    """Activation bits of the table's "A bits" column: the model's quantizer bits (None = float), for FracBits /
    uniform-QAT models the input bits of their policy ("MP" when searched per layer)."""
    if parent is not None and parent["form"] == Form.FRAC:
        a_bits = (parent.get("policy") or {}).get("a_bits")
        if a_bits is None:
            return None
        return int(a_bits[0]) if a_bits[0] == a_bits[1] else "MP"
    return model_args.get("act_bits")

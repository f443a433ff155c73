"""Evaluation of any checkpoint: top-1/top-5 on the test split plus the paper's cost metrics (average bits,
compression, size, BitOPs) -> metrics.json and a per-layer table.

Besides bsq-repro checkpoints (any form), an official checkpoint of the authors' code is accepted: its model is
built from `model.arch` and the dataset, and `weight_bits` (if given) quantizes a float one uniformly, e.g. the
official ResNet-20 at 8 bits under the 4-bit-activation forward (spec P12).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.checkpoint import ForeignCheckpoint, build_model, load_checkpoint, load_model
from bsq.engine import evaluate
from bsq.errors import BSQError
from bsq.metrics import layer_table
from bsq.quant.convert import QuantPolicy, bit_layers, quantize_model
from bsq.stages.common import Session, write_text_atomic
from bsq.stages.measure import cost_metrics


def _official_model(s: Session, weight_bits: int | None):
    from bsq.official import load_official_state, read_official_checkpoint

    ckpt = read_official_checkpoint(s.inputs["checkpoint"])
    s.model_args = s.cfg.model_args()
    model = build_model(s.model_args, "float", None, {})
    if ckpt.get("Nbit_dict"):  # the authors' bit form: build bit layers first, then size them to Nbit_dict
        quantize_model(model, s.cfg.quant.policy())
    load_official_state(model, ckpt)
    if weight_bits is not None:
        if any(True for _ in bit_layers(model)):
            raise BSQError("weight_bits applies to float checkpoints; this official checkpoint is already in bits")
        quantize_model(model, QuantPolicy(nbits=weight_bits, quantize_shortcuts=s.cfg.quant.quantize_shortcuts))
    s.policy = {"quantize_shortcuts": s.cfg.quant.quantize_shortcuts} if any(True for _ in bit_layers(model)) else None
    return model


def run(
    config: Mapping[str, Any] | None,
    inputs: Mapping[str, Any] | None,
    outputs: Mapping[str, Any],
    weight_bits: int | None = None,
) -> dict:
    s = Session("evaluate", config, inputs, outputs, required_inputs=("checkpoint",))
    path = s.inputs["checkpoint"]
    try:
        parent = load_checkpoint(path)
    except ForeignCheckpoint:
        parent = None  # one of the authors' files: built from model.arch and the dataset
    if parent is not None:
        s.check_parent(parent)
        if weight_bits is not None:
            raise BSQError("weight_bits is for official float checkpoints; a bsq-repro checkpoint keeps its own bits")
        s.model_args, s.policy = parent["model"], parent["policy"]
    loaders = s.loaders()
    # Built (and so validated) before the run opens: a wrong file leaves no FAILED run behind.
    model = _official_model(s, weight_bits) if parent is None else load_model(parent, path=path)
    with s.open_run(parent, source="official" if parent is None else None) as tracker:
        tracker.set_tags(
            {"bsq.checkpoint": str(path), "bsq.checkpoint_stage": parent["stage"] if parent else "official"}
        )
        model.to(s.device)
        result = evaluate(model, loaders.test, s.device, s.progress)
        table = layer_table(model)
        table["ones_pct"] = table["ones_pct"].map(lambda z: " ".join(f"{v:g}" for v in z))
        write_text_atomic(s.outputs["layers"], table.to_csv(index=False))
        metrics = {
            "top1": result["top1"],
            "top5": result["top5"],
            "loss": result["loss"],
            "act_bits": model_act_bits(s, parent),
            "checkpoint_stage": parent["stage"] if parent else "official",
            **cost_metrics(model, loaders.info, s.cfg.data.image_size),
        }
        return s.finish(metrics)


def model_act_bits(s: Session, parent: dict[str, Any] | None) -> int | str | None:
    """Activation bits of the table's "A bits" column: the model's quantizer bits (None = float), for FracBits /
    uniform-QAT models the input bits of their policy ("MP" when searched per layer)."""
    if parent is not None and parent["form"] == "frac":
        a_bits = (parent.get("policy") or {}).get("a_bits")
        if a_bits is None:
            return None
        return int(a_bits[0]) if a_bits[0] == a_bits[1] else "MP"
    args = parent["model"] if parent else s.model_args
    return args.get("act_bits")

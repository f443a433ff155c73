"""Finetuning with the scheme fixed (spec §5): the pruned bit model goes to the latent form V = sum (p - n) e with
its precisions frozen, and trains on plain cross-entropy (no regulariser, no re-quantization), V clamped to
[-1, 1] after each step (`finetune.clamp: official`: every `weight` but not `bn`, as the authors). The best
test-accuracy epoch is kept (as the authors' scripts, P14) and saved in bit form (`checkpoint`, spec §5.3: s
unchanged) and in float form (`float_checkpoint`, exactly the quantized values).

"Train from scratch" (the paper's Table 1 baseline, spec §8.1): give the pretrain float checkpoint plus a
`scheme` (scheme.json of a prune run) instead; the float model is quantized to those precisions and finetuned.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from bsq.checkpoint import Form, load_model
from bsq.engine import FitResult, Hooks
from bsq.errors import BSQError
from bsq.quant.convert import (
    MAX_BITS,
    QuantPolicy,
    bit_layers,
    clamp_finetune_,
    export_scheme,
    quantize_model,
    set_form_,
    to_float_model,
)
from bsq.quant.layers import BitLinear
from bsq.stages.context import RunContext, open_context
from bsq.stages.measure import cost_metrics
from bsq.stages.skeleton import Training, TrainingPlan, run_training


def _read_scheme(path) -> dict[str, int]:
    try:
        scheme = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BSQError(f"cannot read scheme {path}: {exc}. Use the scheme.json written by the prune stage.") from exc
    ints = isinstance(scheme, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in scheme.values())
    if not ints:
        raise BSQError(f"{path} is not a scheme: expected {{layer: bits}} with integer bits")
    wrong = {name: bits for name, bits in scheme.items() if not 0 <= bits <= MAX_BITS}
    if wrong:
        raise BSQError(
            f"{path} gives bits outside 0..{MAX_BITS} to {dict(list(wrong.items())[:4])}; a scheme holds 0 (pruned "
            "layer) to the search's maxbit. Use the scheme.json written by the prune stage."
        )
    return scheme


# Bit-form checkpoints finetune accepts without --allow-unpruned: the final re-quantization has been done.
PRUNED_STAGES = ("prune", "finetune")


def _check_pruned(parent: dict[str, Any], path, allow_unpruned: bool) -> None:
    if parent["form"] == Form.BITS and parent.get("stage") not in PRUNED_STAGES and not allow_unpruned:
        raise BSQError(
            f"{path} is the output of the {parent.get('stage')} stage, not of prune: finetuning it would skip the "
            "final re-quantization and train more bits than the scheme BSQ found. Run `bsq prune` on it first and "
            "finetune prune's model.pt, or pass --allow-unpruned to finetune its planes as they are."
        )


def _zero_pruned_layers(model: nn.Module, scheme: dict[str, int]) -> None:
    """Layers the scheme gives 0 bits are all-zero, as BSQ left them; the latent form then keeps them at N = 0,
    so the scratch baseline has exactly the scheme's size and BitOPs."""
    for name, layer in bit_layers(model):
        for what in layer.quantized_tensors():
            if scheme.get(name if what == "weight" else f"{name}.{what}") == 0:
                layer.set_precision_(1, what)  # all-zero 1-bit planes: to_latent_ turns them into N = 0


def quantize_to_scheme_(model: nn.Module, policy: QuantPolicy, scheme: dict[str, int], zeroed_layers: str) -> None:
    """Train from scratch: the float model quantized to the scheme's precisions (max-abs scale per tensor). A
    layer the scheme gives 0 bits is quantized at 1 bit from the float weights (ternary), as the authors'
    `convert.py --dict` (finetune.zeroed_layers: ternary), then zeroed unless so (zero: exactly the scheme's size)."""
    quantize_model(model, policy, scheme={k: max(v, 1) for k, v in scheme.items()})
    if zeroed_layers == "zero":
        _zero_pruned_layers(model, scheme)


def _set_fc_bias_dropped_(model: nn.Module, dropped: bool) -> None:
    """finetune.fc_bias: drop. The last linear layer (the authors' fc) computes without its bias and leaves it
    untouched, as their to_finetune (`pbias = None`, bsq.md §5.2 erratum); `dropped=False` brings it back."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, BitLinear))]
    fc = linears[-1] if linears else None
    if isinstance(fc, BitLinear):
        fc.drop_bias_(dropped)
    elif fc is not None and fc.bias is not None:
        raise BSQError(
            "finetune.fc_bias: drop needs a quantized last layer (quant.quantize_last: true), as the authors' fc; "
            "use finetune.fc_bias: train with a float last layer"
        )


def _start_model(ctx: RunContext, parent: dict[str, Any], scheme: dict[str, int] | None) -> nn.Module:
    """The latent model finetuning starts from: the pruned bit model, or (train from scratch) the float parent
    quantized to the scheme."""
    if scheme is not None:
        model = load_model(parent, ctx.activation_overrides(), ctx.inputs["checkpoint"])
        quantize_to_scheme_(model, ctx.cfg.quant.policy(), scheme, ctx.cfg.finetune.zeroed_layers)
    else:
        model = load_model(parent, path=ctx.inputs["checkpoint"])
        for _, layer in bit_layers(model):
            layer.prune_(0.0)  # spec §5.1 step 3: strip all-zero MSB/LSB planes (no `quant` first)
    set_form_(model, "latent")
    return model


def _read_inputs(ctx: RunContext, allow_unpruned: bool) -> tuple[dict[str, Any], dict[str, int] | None]:
    """The parent checkpoint and, to train from scratch, the scheme: a pruned bit model, or a float one + scheme."""
    parent = ctx.read_parent("checkpoint", forms=(Form.BITS, Form.FLOAT))
    _check_pruned(parent, ctx.inputs["checkpoint"], allow_unpruned)
    scheme = _read_scheme(ctx.inputs["scheme"]) if "scheme" in ctx.inputs else None
    if parent["form"] == Form.FLOAT and scheme is None:
        raise BSQError("finetune from a float checkpoint needs a scheme input (the train-from-scratch baseline)")
    if parent["form"] == Form.BITS and scheme is not None:
        raise BSQError("give a scheme only with a float checkpoint; a pruned bit checkpoint carries its own")
    return parent, scheme


def _final_metrics(job: Training, fit: FitResult) -> dict[str, Any]:
    """The best epoch's accuracy (as the model evaluates with its fc bias) and its cost in bit form."""
    model, cfg = job.model, job.ctx.cfg
    metrics: dict[str, Any] = {}
    final = job.evaluate()
    if cfg.finetune.fc_bias == "drop":  # the checkpoint keeps the bias as it was: report what evaluating it computes
        metrics["finetune_form_top1"] = final["top1"]  # what the authors' finetune prints (no fc bias)
        _set_fc_bias_dropped_(model, False)
        final = job.evaluate()
    last = fit.history[-1] if fit.history else {}
    metrics.update(
        top1=final["top1"],
        top5=final["top5"],
        best_epoch=fit.best.get("epoch"),  # -1: the start state (finetune.best_includes_start)
        final_top1=last.get("test_top1", final["top1"]),
        selection="best test top-1 epoch (as the authors' scripts)",
    )
    set_form_(model, "bits")
    metrics.update(cost_metrics(model, job.plan.loaders.info, cfg.data.image_size))
    return metrics


def _save_float_model(job: Training, metrics: dict[str, Any]) -> None:
    """`float_checkpoint`: the finetuned model in float form, exactly the quantized values."""
    float_model = to_float_model(copy.deepcopy(job.model))
    epochs = job.ctx.cfg.optim.epochs
    job.artifacts.save_model("float_checkpoint", float_model, metrics, epoch=epochs, scheme=export_scheme(job.model))


def run(
    config: Mapping[str, Any] | None,
    inputs: Mapping[str, Any] | None,
    outputs: Mapping[str, Any],
    allow_unpruned: bool = False,
) -> dict:
    ctx = open_context("finetune", config, inputs, outputs)
    cfg = ctx.cfg
    parent, scheme = _read_inputs(ctx, allow_unpruned)
    if parent["form"] == Form.FLOAT:
        model_args, policy = {**parent["model"], **ctx.activation_overrides()}, ctx.bit_policy()
    else:
        model_args, policy = parent["model"], parent["policy"]
    loaders = ctx.loaders()
    model = _start_model(ctx, parent, scheme)  # built (and so validated) before the run opens
    drop_bias = cfg.finetune.fc_bias == "drop"
    _set_fc_bias_dropped_(model, drop_bias)  # a float fc with fc_bias: drop fails here
    plan = TrainingPlan(
        parent=parent,
        loaders=loaders,
        model=model,
        model_args=model_args,
        policy=policy,
        prepare=lambda job: _set_fc_bias_dropped_(job.model, drop_bias),  # again on a model from the resume file
        start_metrics=lambda job, start: {"initial_top1": start["top1"]},
        start_is_candidate=cfg.finetune.best_includes_start,  # the authors' epoch 0 is a candidate (spec §5.2)
        # finetune.clamp: the latent weights (ours) or every `weight` but not `bn` (the authors', spec §5.2)
        hooks=lambda job: Hooks(after_step=lambda m: clamp_finetune_(m, cfg.finetune.clamp)),
        keep_best=True,
        final_metrics=_final_metrics,
        outputs=_save_float_model,
    )
    return run_training(ctx, plan)

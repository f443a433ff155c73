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

from bsq.checkpoint import load_model
from bsq.engine import Hooks, evaluate
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
from bsq.stages.common import Session
from bsq.stages.measure import cost_metrics


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
    if parent["form"] == "bits" and parent.get("stage") not in PRUNED_STAGES and not allow_unpruned:
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


def _start_model(s: Session, parent: dict[str, Any], scheme: dict[str, int] | None) -> nn.Module:
    """The latent model finetuning starts from: the pruned bit model, or (train from scratch) the float parent
    quantized to the scheme."""
    if scheme is not None:
        model = load_model(parent, s.activation_overrides(), s.inputs["checkpoint"])
        quantize_to_scheme_(model, s.cfg.quant.policy(), scheme, s.cfg.finetune.zeroed_layers)
    else:
        model = load_model(parent, path=s.inputs["checkpoint"])
        for _, layer in bit_layers(model):
            layer.prune_(0.0)  # spec §5.1 step 3: strip all-zero MSB/LSB planes (no `quant` first)
    set_form_(model, "latent")
    return model


def run(
    config: Mapping[str, Any] | None,
    inputs: Mapping[str, Any] | None,
    outputs: Mapping[str, Any],
    allow_unpruned: bool = False,
) -> dict:
    s = Session("finetune", config, inputs, outputs, required_inputs=("checkpoint",), optional_inputs=("scheme",))
    cfg = s.cfg
    parent = s.read_parent("checkpoint", forms=("bits", "float"))
    _check_pruned(parent, s.inputs["checkpoint"], allow_unpruned)
    scheme = _read_scheme(s.inputs["scheme"]) if "scheme" in s.inputs else None
    if parent["form"] == "float" and scheme is None:
        raise BSQError("finetune from a float checkpoint needs a scheme input (the train-from-scratch baseline)")
    if parent["form"] == "bits" and scheme is not None:
        raise BSQError("give a scheme only with a float checkpoint; a pruned bit checkpoint carries its own")
    if parent["form"] == "float":
        s.model_args = {**parent["model"], **s.activation_overrides()}
        s.policy = {
            "quantize_first": cfg.quant.quantize_first,
            "quantize_last": cfg.quant.quantize_last,
            "quantize_shortcuts": cfg.quant.quantize_shortcuts,
        }
    else:
        s.model_args, s.policy = parent["model"], parent["policy"]
    loaders = s.loaders()
    model = _start_model(s, parent, scheme)  # built (and so validated) before the run opens
    drop_bias = cfg.finetune.fc_bias == "drop"
    _set_fc_bias_dropped_(model, drop_bias)  # a float fc with fc_bias: drop fails here
    with s.open_run(parent) as tracker:
        if s.resume:
            model = load_model(s.resume, path=s.resume_path)
            _set_fc_bias_dropped_(model, drop_bias)
        model.to(s.device)
        if not s.resume:
            start = evaluate(model, loaders.test, s.device, s.progress)
            s.start_metrics["initial_top1"] = start["top1"]
            tracker.log_metrics(s.start_metrics, step=0)
        metrics: dict[str, Any] = dict(s.start_metrics)
        # finetune.clamp: the latent weights (ours) or every `weight` but not `bn` (the authors', spec §5.2)
        hooks = Hooks(after_step=lambda m: clamp_finetune_(m, cfg.finetune.clamp))
        trainer = s.trainer(model, loaders, tracker, hooks, keep_best=True)
        if cfg.finetune.best_includes_start and not s.resume:
            trainer.add_start_candidate(start)  # the authors' epoch 0 is a best-epoch candidate (spec §5.2)
        result = trainer.fit()
        if result.best_state is not None:
            model.load_state_dict(result.best_state)
        final = evaluate(model, loaders.test, s.device, s.progress)
        if drop_bias:  # the checkpoint keeps the bias as it was: report what evaluating it computes
            metrics["finetune_form_top1"] = final["top1"]  # what the authors' finetune prints (no fc bias)
            _set_fc_bias_dropped_(model, False)
            final = evaluate(model, loaders.test, s.device, s.progress)
        last = result.history[-1] if result.history else {}
        metrics.update(
            top1=final["top1"],
            top5=final["top5"],
            best_epoch=result.best.get("epoch"),  # -1: the start state (finetune.best_includes_start)
            final_top1=last.get("test_top1", final["top1"]),
            selection="best test top-1 epoch (as the authors' scripts)",
        )
        set_form_(model, "bits")
        metrics.update(cost_metrics(model, loaders.info, cfg.data.image_size))
        s.save_model("checkpoint", model, metrics, epoch=cfg.optim.epochs)
        float_model = to_float_model(copy.deepcopy(model))
        s.save_model("float_checkpoint", float_model, metrics, epoch=cfg.optim.epochs, scheme=export_scheme(model))
        return s.finish(metrics, result.history)

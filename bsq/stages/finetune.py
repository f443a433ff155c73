"""Finetuning with the scheme fixed (spec §5): the pruned bit model goes to the latent form V = sum (p - n) e with
its precisions frozen, and trains on plain cross-entropy (no regulariser, no re-quantization), V clamped to
[-1, 1] after each step. The best test-accuracy epoch is kept (as the authors' scripts, P14) and saved in bit form
(`checkpoint`, spec §5.3: s unchanged) and in float form (`float_checkpoint`, exactly the quantized values).

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
from bsq.quant.convert import bit_layers, clamp_bits_, export_scheme, quantize_model, set_form_, to_float_model
from bsq.stages.common import Session
from bsq.stages.measure import cost_metrics


def _read_scheme(path) -> dict[str, int]:
    try:
        scheme = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BSQError(f"cannot read scheme {path}: {exc}. Use the scheme.json written by the prune stage.") from exc
    if not isinstance(scheme, dict) or not all(isinstance(v, int) for v in scheme.values()):
        raise BSQError(f"{path} is not a scheme: expected {{layer: bits}} with integer bits")
    return scheme


def _zero_pruned_layers(model: nn.Module, scheme: dict[str, int]) -> None:
    """Layers the scheme gives 0 bits are all-zero, as BSQ left them; the latent form then keeps them at N = 0,
    so the scratch baseline has exactly the scheme's size and BitOPs."""
    for name, layer in bit_layers(model):
        for what in layer.quantized_tensors():
            if scheme.get(name if what == "weight" else f"{name}.{what}") == 0:
                layer.set_precision_(1, what)  # all-zero 1-bit planes: to_latent_ turns them into N = 0


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    s = Session("finetune", config, inputs, outputs, required_inputs=("checkpoint",), optional_inputs=("scheme",))
    cfg = s.cfg
    parent = s.read_parent("checkpoint", forms=("bits", "float"))
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
    with s.open_run(parent) as tracker:
        if s.resume:
            model = load_model(s.resume, path=s.resume_path)
        elif scheme is not None:
            model = load_model(parent, s.activation_overrides(), s.inputs["checkpoint"])
            quantize_model(model, cfg.quant.policy(), scheme={k: max(v, 1) for k, v in scheme.items()})
            _zero_pruned_layers(model, scheme)
        else:
            model = load_model(parent, path=s.inputs["checkpoint"])
            for _, layer in bit_layers(model):
                layer.prune_(0.0)  # spec §5.1 step 3: strip all-zero MSB/LSB planes (no `quant` first)
        if not s.resume:
            set_form_(model, "latent")
        model.to(s.device)
        if not s.resume:
            start = evaluate(model, loaders.test, s.device, s.progress)
            s.start_metrics["initial_top1"] = start["top1"]
            tracker.log_metrics(s.start_metrics, step=0)
        metrics: dict[str, Any] = dict(s.start_metrics)
        trainer = s.trainer(model, loaders, tracker, Hooks(after_step=clamp_bits_), keep_best=True)
        result = trainer.fit()
        if result.best_state is not None:
            model.load_state_dict(result.best_state)
        final = evaluate(model, loaders.test, s.device, s.progress)
        last = result.history[-1] if result.history else {}
        metrics.update(
            top1=final["top1"],
            top5=final["top5"],
            best_epoch=result.best.get("epoch"),
            final_top1=last.get("test_top1", final["top1"]),
            selection="best test top-1 epoch (as the authors' scripts)",
        )
        set_form_(model, "bits")
        metrics.update(cost_metrics(model, loaders.info, cfg.data.image_size))
        s.save_model("checkpoint", model, metrics, epoch=cfg.optim.epochs)
        float_model = to_float_model(copy.deepcopy(model))
        s.save_model("float_checkpoint", float_model, metrics, epoch=cfg.optim.epochs, scheme=export_scheme(model))
        return s.finish(metrics, result.history)

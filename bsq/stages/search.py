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

from bsq.checkpoint import load_model
from bsq.engine import Hooks, evaluate
from bsq.errors import BSQError
from bsq.metrics import projected_bits, summary
from bsq.quant.convert import bit_layers, clamp_search_, quantize_model, requantize_model, set_form_
from bsq.regularizers import add_penalty_grad_, bit_penalty
from bsq.stages.common import Session


def _bit_model(s: Session, parent: dict[str, Any]) -> nn.Module:
    """The float parent converted to `quant.nbits` planes (or a bit-form parent as is), then `pruning(0)` as the
    official script does once after loading (spec §3.0)."""
    model = load_model(parent, s.activation_overrides(), s.inputs["checkpoint"])
    if parent["form"] == "float":
        quantize_model(model, s.cfg.quant.policy())
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


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    s = Session("search", config, inputs, outputs, required_inputs=("checkpoint",))
    cfg, b = s.cfg, s.cfg.bsq
    parent = s.read_parent("checkpoint", forms=("float", "bits"))
    s.model_args = {**parent["model"], **s.activation_overrides()}
    s.policy = parent.get("policy") or {
        "quantize_first": cfg.quant.quantize_first,
        "quantize_last": cfg.quant.quantize_last,
        "quantize_shortcuts": cfg.quant.quantize_shortcuts,
    }
    loaders = s.loaders()
    model = _bit_model(s, parent)  # built (and so validated) before the run opens
    with s.open_run(parent, alpha=b.alpha) as tracker:
        if s.resume:
            model = load_model(s.resume, path=s.resume_path)
        model.to(s.device)
        if not s.resume:
            start = evaluate(model, loaders.test, s.device, s.progress)
            s.start_metrics.update(initial_top1=start["top1"], initial_penalty=bit_penalty(model).item())
            tracker.log_metrics(s.start_metrics, step=0)

        def requantize(epoch: int, m: nn.Module) -> tuple[dict[str, float], str | None]:
            if epoch % b.requant_interval:
                return {}, None
            before = trainer.history[-1]["test_top1"] if trainer.history else s.start_metrics["initial_top1"]
            scheme = requantize_model(m, cfg.quant.maxbit, b.threshold, b.overflow == "grow", b.prune_shares)
            check_not_degenerate(scheme, b.alpha, f"at the re-quantization of epoch {epoch}")
            after = evaluate(m, loaders.test, s.device, s.progress)["top1"]
            return {"requant_top1_before": before, "requant_top1_after": after}, "reset"

        def epoch_metrics(m: nn.Module) -> dict[str, float]:
            current = summary(m)
            return {
                "avg_bits": current["avg_bits"],
                "compression": current["compression"],
                **projected_bits(m, cfg.quant.maxbit, b.overflow == "grow"),
            }

        hooks = Hooks(
            after_backward=lambda m: add_penalty_grad_(m, b.value, b.penalty, b.reweight),
            after_step=lambda m: clamp_search_(m, b.clamp),
            on_epoch_start=requantize,
            epoch_metrics=epoch_metrics,
        )
        trainer = s.trainer(model, loaders, tracker, hooks)
        result = trainer.fit()
        last = result.history[-1] if result.history else {}
        metrics = {
            **s.start_metrics,
            "alpha": b.value,
            "final_top1": last.get("test_top1"),
            "best_top1": result.best.get("test_top1"),
            "best_epoch": result.best.get("epoch"),
            "final_penalty": last.get("train_penalty"),
            "final_proj_avg_bits": last.get("proj_avg_bits"),
            "final_proj_compression": last.get("proj_compression"),
            "final_bit_sparsity": last.get("bit_sparsity"),
            "epochs": cfg.optim.epochs,
        }
        s.save_model("checkpoint", model, metrics, epoch=cfg.optim.epochs)
        return s.finish(metrics, result.history)

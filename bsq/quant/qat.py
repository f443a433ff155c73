"""Quantization-aware training with FracBits' quantizers (DoReFa weights, PACT inputs), shared by the methods that
train such models (FracBits, uniform QAT): the layer policy of a stage's `qat` and `model.act_bits` settings, and
the float parent with its conv / linear layers swapped for FracBits layers.

The layers quantize their own inputs, so the parent's ReLUs stay float (`FLOAT_ACTIVATIONS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from bsq.checkpoint import load_model
from bsq.quant.frac import FracPolicy, frac_quantize_model, mark_signed_inputs_

__all__ = ["FLOAT_ACTIVATIONS", "activation_range", "qat_policy", "qat_model_args", "qat_model"]

FLOAT_ACTIVATIONS = {"act_bits": None, "stem_act_bits": None}  # the layers quantize their own inputs


def activation_range(act_bits: int | None) -> tuple[int, int] | None:
    """model.act_bits as a fixed input-activation range ([a, a]); None (or >= 32) = unquantized activations."""
    return None if act_bits is None or act_bits >= 32 else (act_bits, act_bits)


def qat_policy(qat: Any, act_bits: int | None, **changes: Any) -> FracPolicy:
    """The layer policy of a `qat` config section (bsq.methods.qat.QATConfig) with inputs at `act_bits`
    (model.act_bits), with method-specific `changes` (bit ranges, granularity, ...)."""
    base = {
        "a_bits": activation_range(act_bits),
        "fixed_bits": qat.fixed_bits,
        "quantize_shortcuts": qat.quantize_shortcuts,
        "variant": qat.variant,
    }
    return FracPolicy(**{**base, **changes})


def qat_model_args(parent: Mapping[str, Any]) -> dict[str, Any]:
    """The model arguments a QAT checkpoint of `parent` (a float checkpoint) records: float ReLUs."""
    return {**parent["model"], **FLOAT_ACTIVATIONS}


def qat_model(
    parent: Mapping[str, Any], policy: FracPolicy, input_shape: tuple[int, ...], path: str | Path = "checkpoint"
) -> nn.Module:
    """The float parent with float ReLUs, its conv / linear layers swapped for FracBits layers; which inputs are
    signed comes from one probe forward of an input of `input_shape` (C, H, W)."""
    model = load_model(dict(parent), FLOAT_ACTIVATIONS, path)
    frac_quantize_model(model, policy)
    mark_signed_inputs_(model, input_shape)
    return model

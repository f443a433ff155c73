"""Headline cost metrics of a model in any form (float, bits, latent), with the paper's conventions."""

from __future__ import annotations

from typing import Any

from torch import nn

from bsq.data import DatasetInfo
from bsq.metrics import FLOAT_BITS, model_bitops_g, summary
from bsq.quant.convert import bit_layers, export_scheme


def cost_metrics(model: nn.Module, info: DatasetInfo, image_size: int | None = None) -> dict[str, Any]:
    """avg bits, compression, size, full size and BitOPs; a float model counts as 32-bit weights."""
    size = image_size or info.image_size
    input_size = (info.in_channels, size, size)
    if not any(True for _ in bit_layers(model)):
        params = sum(p.numel() for p in model.parameters())
        return {
            "avg_bits": float(FLOAT_BITS),
            "compression": 1.0,
            "size_mb": FLOAT_BITS * params / 8e6,
            "full_size_mb": FLOAT_BITS * params / 8e6,
            "bitops_g": model_bitops_g(model, input_size),
        }
    out: dict[str, Any] = dict(summary(model))  # works in bits and latent form alike
    out["bitops_g"] = model_bitops_g(model, input_size)
    out["zero_bit_layers"] = sum(1 for bits in export_scheme(model).values() if bits == 0)
    return out

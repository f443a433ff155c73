"""Headline cost metrics of a model in any form (float, bits, latent, frac), with the paper's conventions."""

from __future__ import annotations

from typing import Any

from torch import nn

from bsq.checkpoint import model_form
from bsq.cost import bitops_keys
from bsq.data import DatasetInfo
from bsq.metrics import FLOAT_BITS, summary, trace_layers
from bsq.quant.accounting import scheme_of


def input_size(info: DatasetInfo, image_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one example of the dataset (ImageNet at the configured crop)."""
    size = image_size or info.image_size
    return (info.in_channels, size, size)


def cost_metrics(model: nn.Module, info: DatasetInfo, image_size: int | None = None) -> dict[str, Any]:
    """avg bits, compression, size, full size and BitOPs; a float model counts as 32-bit weights.

    BitOPs come from one trace of the model (bsq.metrics.trace_layers) counted under every named convention of
    `bsq.cost`: `bitops_g` under the default (`bitops_policy` names it), `bitops_g@<policy>` under each."""
    shape = input_size(info, image_size)
    bitops = bitops_keys(trace_layers(model, shape))
    form = model_form(model)
    if form == "float":
        params = sum(p.numel() for p in model.parameters())
        return {
            "avg_bits": float(FLOAT_BITS),
            "compression": 1.0,
            "size_mb": FLOAT_BITS * params / 8e6,
            "full_size_mb": FLOAT_BITS * params / 8e6,
            **bitops,
        }
    out: dict[str, Any] = dict(summary(model))  # every quantized form alike
    out.update(bitops)
    out["zero_bit_layers"] = sum(1 for key, bits in scheme_of(model).items() if bits == 0 and not key.endswith(".act"))
    return out

"""What cost accounting needs of a quantized layer, whatever method made it: the protocol every quantized conv /
linear layer implements (BSQ's bit-plane layers, the DoReFa / PACT layers of FracBits and uniform QAT), so that
`bsq.metrics` counts bits, size and BitOPs without knowing any method's classes.

- `tensor_costs()`: one `TensorCost` per stored tensor (weight, and a bias where it has one);
- `weight_bits()`: the weight bits that enter BitOPs (effective bits; the mean over kernels when kernel-wise);
- `input_bits()`: the bits of the layer's own input quantizer, or None when its input comes quantized (or not)
  from upstream (BSQ: the ActQuant before it);
- `scheme_entries()`: the layer's part of the method's scheme readout, `{suffix: bits}` (`""` = the layer's weight,
  `".bias"`, `".act"`);
- `quantized_params()`: names of its parameters that the costs count (others are float extras, 32 bits);
- `macs(output)`: multiply-accumulates of one forward that produced `output`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from bsq.cost import FLOAT_BITS  # what an unquantized tensor costs per entry (one home: the accountant)

__all__ = [
    "FLOAT_BITS",
    "TensorCost",
    "QuantizedLayer",
    "quantized_layers",
    "scheme_of",
    "probe",
    "conv_macs",
    "linear_macs",
]


@dataclass(frozen=True)
class TensorCost:
    """One stored tensor as the paper's tables count it (spec §6, fracbits.md §1.5)."""

    suffix: str  # "" for the weight, ".bias"
    params: int
    nbits: float  # stored precision
    bits: float  # bits it costs (0 for an all-zero tensor, spec P15)
    counted: bool  # part of TP / TB and the compression rate
    scale: float = float("nan")  # per-tensor scale, NaN where the quantizer has none (DoReFa)
    ones_pct: list[float] = field(default_factory=list)  # % of ones per bit plane (bit form only)
    a_bits: float | None = None  # the layer's own input bits (FracBits / uniform QAT)


@runtime_checkable
class QuantizedLayer(Protocol):
    def tensor_costs(self) -> list[TensorCost]: ...

    def weight_bits(self) -> float: ...

    def input_bits(self) -> float | None: ...

    def scheme_entries(self) -> dict[str, float]: ...

    def quantized_params(self) -> tuple[str, ...]: ...

    def macs(self, output: torch.Tensor) -> int: ...


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            yield name, module


def scheme_of(model: nn.Module) -> dict[str, float]:
    """The model's scheme readout: `{layer[.bias|.act]: bits}` over its quantized layers."""
    return {
        f"{name}{suffix}": bits
        for name, layer in quantized_layers(model)
        for suffix, bits in layer.scheme_entries().items()
    }


def conv_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of a conv (float or quantized) that produced `output` (batch of one)."""
    kh, kw = module.kernel_size
    return kh * kw * (module.in_channels // module.groups) * output[0].numel()


def linear_macs(module: nn.Module, output: torch.Tensor) -> int:
    return module.in_features * module.out_features


def probe(model: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One eval-mode, no-grad forward of `x` with the given hook handles, which are removed afterwards; the model's
    train / eval mode is restored. The shared probe of cost counting and of FracBits' signed-input detection."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()

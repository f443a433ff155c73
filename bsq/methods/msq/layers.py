"""MSQ's training layers: float `nn.Conv2d` / `nn.Linear` weights (the only trainable tensors: no bit planes, the
memory claim of methods-next.md MSQ) quantized in the forward by `bsq.quant.lsb` at a per-layer precision n, which
pruning lowers. A reconstruction (no public code): the choices are labelled in `bsq.quant.lsb` and `config.py`.

The layer's n is a persistent buffer, so a checkpoint of this form cannot load as a float model by mistake;
`precisions()` reports it for the checkpoint's record and `build` rebuilds the empty model of a resume file.
`to_bit_layer()` gives the BSQ bit layer (planes of q_n, scale s' = s k_n / G_n) computing exactly the same
forward: the stage's final checkpoint is in BSQ's bit form, so evaluate, tables and plots work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bsq.errors import BSQError
from bsq.quant import bits as B
from bsq.quant import lsb
from bsq.quant.accounting import TensorCost, conv_macs, linear_macs
from bsq.quant.convert import float_layers, is_shortcut, set_submodule
from bsq.quant.layers import BitConv2d, BitLayer, BitLinear, conv_arguments

__all__ = [
    "MSQPolicy",
    "MSQLayer",
    "MSQConv2d",
    "MSQLinear",
    "msq_layers",
    "msq_quantize_model",
    "build",
    "export_",
    "training_footprint",
]

FORM = "msq"
_LEVEL_CODES = (lsb.Levels.NESTED, lsb.Levels.BSQ)  # msq_levels buffer value -> grid


@dataclass(frozen=True)
class MSQPolicy:
    """Which float layers MSQ quantizes (BSQ's `quant` selection, so both count the same weights) and how."""

    nbits: int = 8  # msq.init_bits
    bias_bits: int = 8  # the fc bias: fixed, never pruned (ours)
    levels: str = "nested"
    quantize_first: bool = True
    quantize_last: bool = True
    quantize_shortcuts: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MSQLayer:
    """What MSQConv2d and MSQLinear share (mixed into the float layer classes)."""

    checkpoint_form = FORM
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_msq(self, nbits: int, bias_bits: int, levels: str) -> None:
        # n lives in a persistent buffer (so an msq checkpoint never loads silently as a float model) and in a
        # Python int the forward reads (no device sync per layer and step)
        self.register_buffer("msq_nbits", torch.tensor(int(nbits)))
        self.register_buffer("msq_bias_nbits", torch.tensor(int(bias_bits)))
        # the grid too, so a checkpoint restores it without a policy key (the final checkpoint's policy is BSQ's)
        self.register_buffer("msq_levels", torch.tensor(_LEVEL_CODES.index(lsb.Levels(levels))))
        self._n, self._nb = int(nbits), int(bias_bits)
        self.levels = str(lsb.Levels(levels))
        self.counted = True  # part of TP / TB (quantized shortcuts are not, as BSQ's)
        self.regularized = True

    @property
    def nbits(self) -> int:
        return self._n

    @property
    def bias_nbits(self) -> int:
        return self._nb

    def set_bits_(self, nbits: int) -> None:
        self.msq_nbits.fill_(int(nbits))
        self._n = int(nbits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        self._n, self._nb = int(self.msq_nbits), int(self.msq_bias_nbits)
        self.levels = str(_LEVEL_CODES[int(self.msq_levels)])

    def precisions(self) -> dict[str, int]:
        out = {"": self.nbits}
        if self.bias is not None:
            out[".bias"] = self.bias_nbits
        return out

    def quantized(self, what: str = "weight") -> torch.Tensor:
        tensor = self.weight if what == "weight" else self.bias
        return lsb.quantize_weight(tensor, self.nbits if what == "weight" else self.bias_nbits, self.levels)

    def residual(self) -> torch.Tensor:
        """The LSB residual r of the weight at its current n (differentiable in the weight)."""
        return lsb.lsb_residual(self.weight, self.nbits, self.levels)

    def nonzero_share(self) -> float:
        return lsb.nonzero_share(self.weight, self.nbits, self.levels)

    # ---- QuantizedLayer protocol (bsq.quant.accounting) ------------------------------------------------------
    def _tensors(self) -> list[tuple[str, torch.Tensor, int]]:
        out = [("", self.weight, self.nbits)]
        if self.bias is not None:
            out.append((".bias", self.bias, self.bias_nbits))
        return out

    @torch.no_grad()
    def _bits(self, tensor: torch.Tensor, nbits: int) -> int:
        """BSQ's convention: n magnitude bits (the sign free), 0 for an all-zero tensor (spec P15)."""
        return (
            0 if nbits == 0 or not bool(lsb.codes(tensor, lsb.msq_scale(tensor), nbits, self.levels).any()) else nbits
        )

    def tensor_costs(self) -> list[TensorCost]:
        costs = []
        for suffix, tensor, nbits in self._tensors():
            scale = float(lsb.export_scale(lsb.msq_scale(tensor), max(nbits, 1), self.levels))
            costs.append(TensorCost(suffix, tensor.numel(), nbits, self._bits(tensor, nbits), self.counted, scale))
        return costs

    def weight_bits(self) -> float:
        return float(self._bits(self.weight, self.nbits))

    def input_bits(self) -> float | None:
        return None  # the model's ActQuant before the layer quantizes its input, as for BSQ's layers

    def scheme_entries(self) -> dict[str, float]:
        return {suffix: self._bits(tensor, nbits) for suffix, tensor, nbits in self._tensors()}

    def quantized_params(self) -> tuple[str, ...]:
        return ("weight", "bias")

    # ---- export -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _planes(self, tensor: torch.Tensor, nbits: int) -> B.Planes:
        s = lsb.msq_scale(tensor)
        signed = (torch.sign(tensor) * lsb.codes(tensor, s, nbits, self.levels)).long()
        return B.Planes(
            B.int_to_planes(signed.clamp(min=0), nbits, tensor.dtype),
            B.int_to_planes((-signed).clamp(min=0), nbits, tensor.dtype),
            lsb.export_scale(s, nbits, self.levels),
            nbits,
        )

    def _fill_bit_layer(self, layer: BitLayer) -> BitLayer:
        layer.to(self.weight.device)
        layer._set_planes("weight", self._planes(self.weight, self.nbits))
        if self.bias is not None:
            layer._set_planes("bias", self._planes(self.bias, self.bias_nbits))
        layer.counted, layer.regularized = self.counted, self.regularized
        return layer


class MSQConv2d(MSQLayer, nn.Conv2d):
    def __init__(self, *args, nbits: int = 8, bias_bits: int = 8, levels: str = "nested", **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_msq(nbits, bias_bits, levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.quantized("bias") if self.bias is not None else None
        return F.conv2d(x, self.quantized("weight"), bias, self.stride, self.padding, self.dilation, self.groups)

    def macs(self, output: torch.Tensor) -> int:
        return conv_macs(self, output)

    def to_bit_layer(self) -> BitConv2d:
        args = conv_arguments(self)
        return self._fill_bit_layer(
            BitConv2d(*args, nbits=self.nbits, bias_nbits=self.bias_nbits if args[-1] else None)
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nbits={self.nbits}, levels={self.levels}"


class MSQLinear(MSQLayer, nn.Linear):
    def __init__(self, *args, nbits: int = 8, bias_bits: int = 8, levels: str = "nested", **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_msq(nbits, bias_bits, levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.quantized("bias") if self.bias is not None else None
        return F.linear(x, self.quantized("weight"), bias)

    def macs(self, output: torch.Tensor) -> int:
        return linear_macs(self, output)

    def to_bit_layer(self) -> BitLinear:
        has_bias = self.bias is not None
        layer = BitLinear(
            self.in_features,
            self.out_features,
            has_bias,
            nbits=self.nbits,
            bias_nbits=self.bias_nbits if has_bias else None,
        )
        return self._fill_bit_layer(layer)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nbits={self.nbits}, levels={self.levels}"


def msq_layers(model: nn.Module) -> Iterator[tuple[str, MSQLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MSQLayer):
            yield name, module


def _chosen(model: nn.Module, policy: MSQPolicy) -> list[tuple[str, nn.Module]]:
    """The float layers BSQ's QuantPolicy of the same switches would quantize (bsq.quant.convert.quantize_model)."""
    candidates = float_layers(model)
    if not candidates:
        raise BSQError("the model has no nn.Conv2d / nn.Linear layers to quantize")
    first, last = candidates[0][0], candidates[-1][0]
    return [
        (name, module)
        for name, module in candidates
        if not (name == first and not policy.quantize_first)
        and not (name == last and not policy.quantize_last)
        and not (is_shortcut(name) and not policy.quantize_shortcuts)
    ]


def _twin(module: nn.Module, nbits: int, bias_bits: int, levels: str) -> MSQLayer:
    extra = {"nbits": nbits, "bias_bits": bias_bits, "levels": levels, "device": module.weight.device}
    if isinstance(module, nn.Conv2d):
        *args, bias = conv_arguments(module)
        layer = MSQConv2d(*args, bias=bias, **extra)
    else:
        layer = MSQLinear(module.in_features, module.out_features, module.bias is not None, **extra)
    with torch.no_grad():
        layer.weight.copy_(module.weight)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    return layer


def msq_quantize_model(model: nn.Module, policy: MSQPolicy, precisions: Mapping[str, int] | None = None) -> nn.Module:
    """Swap the chosen float layers for MSQ layers in place (float weights copied), at `policy.nbits` or at the
    precisions of a checkpoint (`{layer: n, layer.bias: n_b}`)."""
    for name, module in _chosen(model, policy):
        nbits = int(precisions.get(name, policy.nbits)) if precisions else policy.nbits
        bias_bits = int(precisions.get(f"{name}.bias", policy.bias_bits)) if precisions else policy.bias_bits
        layer = _twin(module, nbits, bias_bits, policy.levels)
        if is_shortcut(name):
            layer.counted = False  # quantized shortcuts are not counted, as BSQ's paper-era ones (spec §4.4)
        set_submodule(model, name, layer)
    return model


def build(model: nn.Module, policy: Mapping[str, Any] | None, precisions: Mapping[str, int]) -> nn.Module:
    """The training-form model of an `msq` checkpoint (Method.forms): the float model from create_model with the
    layers BSQ's policy keys select (`quantize_first/last/shortcuts`: the stage records BSQ's policy, which its
    final bit-form checkpoint needs) swapped at the recorded precisions; the state dict then restores the weights,
    the bits and the grid (buffers)."""
    keys = ("quantize_first", "quantize_last", "quantize_shortcuts")
    return msq_quantize_model(model, MSQPolicy(**{k: v for k, v in (policy or {}).items() if k in keys}), precisions)


def export_(model: nn.Module) -> nn.Module:
    """Every MSQ layer replaced in place by the BSQ bit layer computing the same forward (Form.BITS)."""
    for name, layer in list(msq_layers(model)):
        set_submodule(model, name, layer.to_bit_layer())
    return model


def training_footprint(model: nn.Module, bsq_bits: int = 8) -> dict[str, int]:
    """Trainable tensors of an MSQ model vs BSQ's planes for the same quantized weights (the abstract's "up to 8x
    fewer trainable parameters"), for the training-cost benchmark. SGD with momentum keeps one buffer per trainable
    entry, so the optimizer state scales the same way (x4 bytes in float32).

    - `trainable_params`: every entry MSQ trains (float weights, biases, BN);
    - `quantized_params`: the weight (and bias) entries of the MSQ layers;
    - `bsq_params`: what BSQ would train instead: 2 planes x N bits per quantized entry plus one scale per tensor,
      with the rest (BN, float layers) the same."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(t.numel() for _, layer in msq_layers(model) for _, t, _ in layer._tensors())
    scales = sum(len(layer._tensors()) for _, layer in msq_layers(model))
    bsq = trainable - quantized + 2 * bsq_bits * quantized + scales
    return {
        "trainable_params": trainable,
        "quantized_params": quantized,
        "bsq_params": bsq,
        "optimizer_state_bytes": 4 * trainable,
        "bsq_optimizer_state_bytes": 4 * bsq,
    }

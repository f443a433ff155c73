"""CSQ's bit-plane layers with gated bit positions (methods-next.md CSQ; lawsonX/CSQ bits/bitcs.py).

Per layer with N bits: real-valued planes p, n of shape [*W.shape, N] (b = 0 the MSB, as BSQ's planes), a trainable
scale S and one gate parameter s_b per bit position. At temperature beta:

    m_b = sigmoid(beta s_b)          (hard gates: 1[s_b > 0])
    W   = S sum_b (sigmoid(beta p_b) - sigmoid(beta n_b)) m_b 2^(N-1-b) / (2^N - 1)

with no straight-through estimator on the weight bits. With hard planes too (`hard_planes`: 1[p > 0], 1[n > 0])
the weight is BSQ's bit-layer forward of those gated binary planes, computed by the same fused function, so the
export to `BitConv2d` / `BitLinear` gives the same outputs. A bias (the fc's) is BSQ's hard-STE bit planes at N
bits, not gated (the authors' `bit_STE` bias). Deviation: the authors register the place values `exps` as
Parameters, so SGD trains them; ours are fixed.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bsq.quant import bits as B
from bsq.quant.convert import QuantPolicy, float_layers, is_shortcut, set_submodule
from bsq.quant.layers import BitConv2d, BitLayer, BitLinear, conv_arguments
from bsq.quant.ste import planes_to_weight_ste

__all__ = ["CSQLayer", "CSQConv2d", "CSQLinear", "csq_layers", "csq_quantize_model", "build", "set_state_", "export_"]

REWIND = ".rewind"  # precisions() entry of a layer that keeps rewind planes (rounds > 1)


class CSQLayer(nn.Module):
    """Shared machinery of CSQConv2d / CSQLinear; subclasses apply the weight and build the bit-layer twin."""

    checkpoint_form = "csq"

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, nbits: int, rewindable: bool = False) -> None:
        super().__init__()
        self.weight_shape, self.nbits, self.has_bias = tuple(weight_shape), int(nbits), bias
        self.pweight = nn.Parameter(torch.zeros(*weight_shape, nbits))
        self.nweight = nn.Parameter(torch.zeros(*weight_shape, nbits))
        self.scale = nn.Parameter(torch.ones(()))
        self.gate = nn.Parameter(torch.zeros(nbits))
        if bias:
            self.pbias = nn.Parameter(torch.zeros(weight_shape[0], nbits))
            self.nbias = nn.Parameter(torch.zeros(weight_shape[0], nbits))
            self.biasscale = nn.Parameter(torch.ones(()))
        self.register_buffer("_e", B.place_values(nbits), persistent=False)
        self.rewindable = rewindable
        if rewindable:  # the planes of the rewind epoch (dist_img_cs.py `checkpoint()` / `rewind_weights()`)
            self.register_buffer("rewind_pweight", torch.zeros_like(self.pweight))
            self.register_buffer("rewind_nweight", torch.zeros_like(self.nweight))
        self.beta, self.hard_gates, self.hard_planes = 1.0, False, False
        self.counted = True  # part of R1 and the accountant's compression (shortcuts are not, as BSQ's)

    @torch.no_grad()
    def load_float_(self, weight: torch.Tensor, bias: torch.Tensor | None, plane_init: str, gate_init: float) -> None:
        """BSQ's initialisation (bitcs.py ini2bit): S = max|w|, digits of round(|w| (2^N-1) / S) into p (w > 0) or
        n; "digits" keeps them as {0, 1} (authors), "signed" stores 2 d - 1 so sigmoid(beta p) -> d."""
        planes = B.float_to_planes(weight.detach().float(), self.nbits)
        pos, neg = (planes.pos, planes.neg) if plane_init == "digits" else (2 * planes.pos - 1, 2 * planes.neg - 1)
        self.pweight.copy_(pos)
        self.nweight.copy_(neg)
        self.scale.copy_(planes.scale)
        self.gate.fill_(gate_init)
        if self.has_bias:
            b = B.float_to_planes(bias.detach().float(), self.nbits)
            self.pbias.copy_(b.pos)
            self.nbias.copy_(b.neg)
            self.biasscale.copy_(b.scale)

    def mask(self) -> torch.Tensor:
        """m_b: sigmoid(beta s_b), or 1[s_b > 0] once hard (no gradient then, as the authors' compute_mask)."""
        if self.hard_gates or self.hard_planes:
            return (self.gate > 0).to(self.gate.dtype)
        return torch.sigmoid(self.beta * self.gate)

    def weight_value(self) -> torch.Tensor:
        m = self.mask()
        if self.hard_planes:
            pos, neg = self.hard_weight_planes()
            return planes_to_weight_ste(pos, neg, self._e, self.scale, self.nbits)
        soft = torch.sigmoid(self.beta * self.pweight) - torch.sigmoid(self.beta * self.nweight)
        return (soft * self._e * m).sum(-1) * self.scale

    def hard_weight_planes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated binary planes 1[p > 0] m, 1[n > 0] m with hard gates."""
        m = (self.gate > 0).to(self.pweight.dtype)
        return (self.pweight > 0).to(m.dtype) * m, (self.nweight > 0).to(m.dtype) * m

    def bias_value(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        return planes_to_weight_ste(self.pbias, self.nbias, self._e, self.biasscale, self.nbits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_weight(x, self.weight_value(), self.bias_value())

    def precisions(self) -> dict[str, int]:
        """N per stored tensor, recorded in resume files (`bsq.checkpoint`); `.rewind` marks rewind buffers."""
        out = {"": self.nbits}
        if self.has_bias:
            out[".bias"] = self.nbits
        if self.rewindable:
            out[REWIND] = 1
        return out

    @torch.no_grad()
    def bit_planes(self, compact: bool) -> tuple[B.Planes, B.Planes | None]:
        """The exact model's weight (and bias) planes in BSQ's sign-magnitude form; `compact` drops all-zero MSB /
        LSB planes (BSQ's pruning(0): the same function up to float rounding of the rescaled scale)."""
        pos, neg = self.hard_weight_planes()
        weight = B.requantize(B.Planes(pos, neg, self.scale.detach(), self.nbits), self.nbits, grow=False)
        bias = None
        if self.has_bias:
            bias = B.Planes(self.pbias.detach(), self.nbias.detach(), self.biasscale.detach(), self.nbits)
            bias = B.requantize(bias, self.nbits, grow=False)
        if compact:
            weight = B.prune(weight, 0.0)
            bias = B.prune(bias, 0.0) if bias is not None else None
        return weight, bias

    @torch.no_grad()
    def to_bit_layer(self, compact: bool = False) -> BitLayer:
        """The BSQ bit layer (Form.BITS) of the hardened model: same scale, gated binary planes."""
        weight, bias = self.bit_planes(compact)
        layer = self._empty_bit_twin(weight.nbits, bias.nbits if bias is not None else None)
        layer.to(self.scale.device)
        layer._set_planes("weight", weight)  # noqa: SLF001  (BitLayer's own plane registration, as to_bits_)
        if bias is not None:
            layer._set_planes("bias", bias)  # noqa: SLF001
        layer.counted = self.counted
        return layer

    @abc.abstractmethod
    def _apply_weight(self, x, weight, bias):
        """F.conv2d / F.linear with this layer's hyper-parameters."""

    @abc.abstractmethod
    def _empty_bit_twin(self, nbits: int, bias_nbits: int | None) -> BitLayer:
        """A fresh BitConv2d / BitLinear of this layer's shape, the target of the export."""

    def extra_repr(self) -> str:
        state = "hard" if self.hard_planes else ("hard gates" if self.hard_gates else "soft")
        return f"{self.weight_shape}, nbits={self.nbits}, beta={self.beta:.4g}, {state}"


class CSQConv2d(CSQLayer):
    def __init__(self, conv: nn.Conv2d, nbits: int, rewindable: bool = False) -> None:
        super().__init__(tuple(conv.weight.shape), conv.bias is not None, nbits, rewindable)
        self.arguments = conv_arguments(conv)  # what rebuilds its BitConv2d twin
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def _apply_weight(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _empty_bit_twin(self, nbits: int, bias_nbits: int | None) -> BitLayer:
        return BitConv2d(*self.arguments, nbits=nbits, bias_nbits=bias_nbits)


class CSQLinear(CSQLayer):
    def __init__(self, linear: nn.Linear, nbits: int, rewindable: bool = False) -> None:
        super().__init__(tuple(linear.weight.shape), linear.bias is not None, nbits, rewindable)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _apply_weight(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _empty_bit_twin(self, nbits: int, bias_nbits: int | None) -> BitLayer:
        return BitLinear(self.in_features, self.out_features, self.has_bias, nbits=nbits, bias_nbits=bias_nbits)


def csq_layers(model: nn.Module) -> Iterator[tuple[str, CSQLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, CSQLayer):
            yield name, module


def _chosen(model: nn.Module, policy: QuantPolicy) -> list[tuple[str, nn.Module]]:
    """The layers BSQ's policy quantizes (bsq.quant.convert.quantize_model): first conv and fc by default, 1x1
    shortcuts float unless quantize_shortcuts (then quantized but uncounted)."""
    candidates = float_layers(model)
    if not candidates:
        return []
    first, last = candidates[0][0], candidates[-1][0]
    return [
        (name, module)
        for name, module in candidates
        if name not in policy.exclude
        and not (name == first and not policy.quantize_first)
        and not (name == last and not policy.quantize_last)
        and not (is_shortcut(name) and not policy.quantize_shortcuts)
    ]


def csq_quantize_model(
    model: nn.Module,
    policy: QuantPolicy,
    precisions: Mapping[str, int] | None = None,
    plane_init: str | None = "digits",
    gate_init: float = 0.0,
    rewindable: bool = False,
) -> nn.Module:
    """Swap the policy's float layers for CSQ layers in place at `policy.nbits` (or `precisions[name]`),
    initialised from the float weights (`plane_init` None: left empty, for a state dict to fill)."""
    for name, module in _chosen(model, policy):
        nbits = int(precisions.get(name, policy.nbits)) if precisions else policy.nbits
        keep = rewindable or bool(precisions and precisions.get(f"{name}{REWIND}"))
        layer = (CSQConv2d if isinstance(module, nn.Conv2d) else CSQLinear)(module, nbits, keep)
        layer.to(module.weight.device)
        if plane_init is not None:
            layer.load_float_(module.weight, module.bias, plane_init, gate_init)
        layer.counted = not is_shortcut(name)
        set_submodule(model, name, layer)
    return model


def build(model: nn.Module, policy: Mapping[str, Any] | None, precisions: Mapping[str, int]) -> nn.Module:
    """`Method.forms["csq"]`: the empty CSQ training-form model of a resume file, from its float model."""
    return csq_quantize_model(model, QuantPolicy(**(policy or {})), precisions, plane_init=None)


def set_state_(model: nn.Module, beta: float, hard_gates: bool, hard_planes: bool = False) -> bool:
    """Temperature and gate phase of every CSQ layer; hard gates stop training (requires_grad off, so DDP sees
    no unused parameter). Returns whether the set of trained parameters changed."""
    changed = False
    for _, layer in csq_layers(model):
        layer.beta, layer.hard_gates, layer.hard_planes = float(beta), hard_gates, hard_planes
        trains = not (hard_gates or hard_planes)
        changed |= layer.gate.requires_grad != trains
        layer.gate.requires_grad_(trains)
    return changed


def export_(model: nn.Module, compact: bool = False) -> nn.Module:
    """Replace every CSQ layer by its exact BSQ bit layer (Form.BITS), in place."""
    for name, layer in list(csq_layers(model)):
        set_submodule(model, name, layer.to_bit_layer(compact))
    return model

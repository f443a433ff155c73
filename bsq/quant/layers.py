"""Bit-plane layers: `BitConv2d` and `BitLinear` (spec §1, §5), drop-in for `nn.Conv2d` / `nn.Linear`.

A layer is in one of two forms:
- "bits" (BSQ search): trainable planes `pweight`/`nweight` (weight shape + (N,)), scale `scale`;
- "latent" (finetune, spec §5.1): trainable normalised weight `weight` = V in [-1, 1], scale `scale`, N fixed.
Both share one forward: W = s * Q_N(u) with the identity STE. An optional bias is quantized the same way with
its own precision and scale (`pbias`/`nbias`/`biasscale`), as the official fc layer does (spec P17).
State-dict keys match the official bit form (spec §7.3) so its checkpoints load after stripping `module.`.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from bsq.quant import bits as B
from bsq.quant.accounting import TensorCost, conv_macs, linear_macs
from bsq.quant.ste import planes_to_weight_ste, quantize_levels_ste

__all__ = ["BitLayer", "BitConv2d", "BitLinear", "is_bit_layer", "conv_arguments"]


class _BitForms:
    """Form conversions of a BitLayer: float weights in, float twin out, bits <-> latent (spec §5.1)."""

    @torch.no_grad()
    def load_float_(self, weight: torch.Tensor, bias: torch.Tensor | None, nbits: int, bias_nbits: int | None) -> None:
        """Initialise the planes from float tensors at the given precisions (spec §1.3)."""
        if self.form == "latent":
            for what in self.quantized_tensors():
                delattr(self, what)
        self.form = "bits"
        self._set_planes("weight", B.float_to_planes(weight, nbits))
        if self.has_bias:
            if bias is None:
                raise ValueError("a float bias is required for a layer with a quantized bias")
            self._set_planes("bias", B.float_to_planes(bias, nbits if bias_nbits is None else bias_nbits))

    def _init_from_float(self, module: nn.Module, nbits: int, bias_nbits: int | None):
        self.to(module.weight.device)
        self.load_float_(module.weight, module.bias, nbits, bias_nbits)
        return self

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        """Plain float layer holding exactly the quantized values (the official `to_float`, spec §5.3)."""
        twin = self._empty_float_twin()
        twin.weight.copy_(self.quantized("weight"))
        if self.has_bias:
            twin.bias.copy_(self.quantized("bias"))
        return twin

    @abc.abstractmethod
    def _empty_float_twin(self) -> nn.Module:
        """A fresh nn.Conv2d / nn.Linear with this layer's hyper-parameters."""

    @torch.no_grad()
    def set_precision_(self, nbits: int, what: str = "weight") -> None:
        """Resize the (empty) planes to N before `load_state_dict` of a bit-form checkpoint (spec §1.1, P20)."""
        shape = self.weight_shape if what == "weight" else self.weight_shape[:1]
        device = getattr(self, self._names(what)[2]).device
        self._set_planes(what, B.float_to_planes(torch.zeros(shape, device=device), nbits))

    @torch.no_grad()
    def to_latent_(self) -> None:
        """Bits -> finetune form (spec §5.1): V = sum_b (p_b - n_b) e_b, s kept, N fixed; all-zero 1-bit -> N=0."""
        if self.form == "latent":
            return
        for what in self.quantized_tensors():
            p_name, n_name, _, n_attr = self._names(what)
            zero = self.is_all_zero(what) and getattr(self, n_attr) == 1
            latent = nn.Parameter(self._unit(what).detach().clone())
            delattr(self, p_name)
            delattr(self, n_name)
            setattr(self, what, latent)
            if zero:
                setattr(self, n_attr, 0)
        self.form = "latent"

    @torch.no_grad()
    def to_bits_(self) -> None:
        """Finetune form -> bits (spec §5.3): I = round(|clip(V)| (2^N-1)) split by sign, s unchanged."""
        if self.form == "bits":
            return
        for what in self.quantized_tensors():
            _, _, s_name, n_attr = self._names(what)
            nbits = max(getattr(self, n_attr), 1)
            ints = self.integer_levels(what)
            scale = getattr(self, s_name).detach()
            delattr(self, what)
            planes = B.Planes(
                B.int_to_planes(ints.clamp(min=0), nbits),
                B.int_to_planes((-ints).clamp(min=0), nbits),
                scale,
                nbits,
            )
            self._set_planes(what, planes)
        self.form = "bits"


class _BitCosts:
    """What a BitLayer reports to cost accounting (the QuantizedLayer protocol of bsq.quant.accounting)."""

    def tensor_costs(self) -> list[TensorCost]:
        """BSQ counts magnitude bits (the sign is free), 0 for an all-zero tensor (spec P15)."""
        costs = []
        for what in self.quantized_tensors():
            ones = B.ones_percent(*self.planes(what)[:2]) if self.form == "bits" else []
            scale = float(getattr(self, self._names(what)[2]).detach())
            suffix = "" if what == "weight" else ".bias"
            bits = self.effective_bits(what)
            costs.append(
                TensorCost(
                    suffix,
                    self.num_params(what),
                    self.precision(what),
                    bits,
                    self.counted,
                    scale,
                    [round(z, 2) for z in ones],
                )
            )
        return costs

    def weight_bits(self) -> float:
        return self.effective_bits("weight")

    def input_bits(self) -> float | None:
        return None  # the ActQuant before the layer quantizes its input

    def scheme_entries(self) -> dict[str, float]:
        entries: dict[str, float] = {"": self.effective_bits("weight")}
        if self.has_bias:
            entries[".bias"] = self.effective_bits("bias")
        return entries

    def quantized_params(self) -> tuple[str, ...]:
        return ("pweight", "nweight", "pbias", "nbias", "weight", "bias")


class BitLayer(_BitForms, _BitCosts, nn.Module, abc.ABC):
    """Shared machinery; subclasses only say how to apply the weight (`_apply_weight`) and how to build a float twin."""

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, nbits: int, bias_nbits: int | None) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.form = "bits"
        self.counted = True  # part of TP/TB and the compression rate (shortcut convs are not, spec §6.1)
        self.regularized = True  # part of the group-Lasso penalty (paper-era shortcuts are, but are not counted)
        self.nbits = 0
        self._set_planes("weight", B.float_to_planes(torch.zeros(self.weight_shape), nbits))
        self.has_bias = bias
        self.bias_dropped = False  # finetune.fc_bias: drop (the authors' to_finetune, bsq.md §5.2 erratum)
        if bias:
            self._set_planes("bias", B.float_to_planes(torch.zeros(self.weight_shape[0]), bias_nbits or nbits))

    # ---- storage -------------------------------------------------------------------------------------------
    def _names(self, what: str) -> tuple[str, str, str, str]:
        if what == "weight":
            return "pweight", "nweight", "scale", "nbits"
        return "pbias", "nbias", "biasscale", "bias_nbits"

    def _set_planes(self, what: str, planes: B.Planes) -> None:
        """(Re)register the planes of `what` as fresh Parameters: shapes change at re-quantization, so the
        optimizer must be rebuilt afterwards (the official code does the same, spec P9)."""
        p_name, n_name, s_name, n_attr = self._names(what)
        device = planes.pos.device
        setattr(self, p_name, nn.Parameter(planes.pos.detach().clone()))
        setattr(self, n_name, nn.Parameter(planes.neg.detach().clone()))
        setattr(self, s_name, nn.Parameter(planes.scale.detach().clone().reshape(()).to(device)))
        setattr(self, n_attr, int(planes.nbits))
        self.register_buffer(f"_e_{what}", B.place_values(planes.nbits, planes.pos.dtype, device), persistent=False)

    def planes(self, what: str = "weight") -> B.Planes:
        """Current bit form of the weight or bias (requires the "bits" form)."""
        if self.form != "bits":
            raise RuntimeError(f"{type(self).__name__} is in '{self.form}' form; planes exist only in 'bits' form")
        p_name, n_name, s_name, n_attr = self._names(what)
        return B.Planes(getattr(self, p_name), getattr(self, n_name), getattr(self, s_name), getattr(self, n_attr))

    def quantized_tensors(self) -> list[str]:
        """Which tensors of this layer are quantized: 'weight', and 'bias' when present."""
        return ["weight", "bias"] if self.has_bias else ["weight"]

    def num_params(self, what: str = "weight") -> int:
        """P_l: entries of the quantized tensor (spec §0)."""
        shape = self.weight_shape if what == "weight" else self.weight_shape[:1]
        return int(torch.Size(shape).numel())

    def precision(self, what: str = "weight") -> int:
        return getattr(self, self._names(what)[3])

    def is_all_zero(self, what: str = "weight") -> bool:
        """A "0-bit" tensor: every stored level is zero (counted as 0 bits, spec P15)."""
        return bool((self.integer_levels(what) == 0).all())

    def effective_bits(self, what: str = "weight") -> int:
        """Bits the tensor really costs: N, or 0 when all its levels are zero."""
        return 0 if self.is_all_zero(what) else self.precision(what)

    # ---- forward -------------------------------------------------------------------------------------------
    def _unit(self, what: str) -> torch.Tensor:
        if self.form == "bits":
            p_name, n_name, _, _ = self._names(what)
            return B.planes_to_unit(getattr(self, p_name), getattr(self, n_name), getattr(self, f"_e_{what}"))
        return self.weight if what == "weight" else self.bias

    def quantized(self, what: str = "weight") -> torch.Tensor:
        """W = s * Q_N(clip(u, -1, 1)) with the identity STE from Q to u (spec §1.4-1.5)."""
        _, _, s_name, n_attr = self._names(what)
        nbits, scale = getattr(self, n_attr), getattr(self, s_name)
        if nbits == 0:
            return torch.zeros(self.weight_shape if what == "weight" else self.weight_shape[:1], device=scale.device)
        if self.form == "bits":
            p_name, n_name, _, _ = self._names(what)
            pos, neg = getattr(self, p_name), getattr(self, n_name)
            return planes_to_weight_ste(pos, neg, getattr(self, f"_e_{what}"), scale, nbits)
        return B.dequantize(quantize_levels_ste(self._unit(what), nbits), nbits, scale)

    @torch.no_grad()
    def integer_levels(self, what: str = "weight") -> torch.Tensor:
        """Signed integers I the forward uses (int64): W = s * I / (2^N - 1)."""
        nbits = self.precision(what)
        if nbits == 0:
            return torch.zeros(self.weight_shape if what == "weight" else self.weight_shape[:1], dtype=torch.long)
        return B.unit_to_levels(self._unit(what), nbits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.quantized("bias") if self.has_bias and not self.bias_dropped else None
        return self._apply_weight(x, self.quantized("weight"), bias)

    def drop_bias_(self, dropped: bool = True) -> None:
        """Leave the quantized bias out of the forward and freeze its tensors (no gradient, so SGD's momentum and
        weight decay skip them too), or bring it back: the authors' finetune sets `pbias = None`, so the fc bias
        takes no part and returns unchanged in `best_bin` (bsq.md §5.2 erratum). Not saved: a state dict holds
        the bias either way."""
        self.bias_dropped = dropped and self.has_bias
        for name in ("pbias", "nbias", "bias", "biasscale"):
            tensor = getattr(self, name, None)
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(not dropped)

    @abc.abstractmethod
    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The float op (conv / linear) applied with the quantized weight and bias."""

    # ---- BSQ steps -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def clamp_(self) -> None:
        """Projection after each optimizer step: planes to [0, 2] (spec §1.2) or latent V to [-1, 1] (§5.2)."""
        for what in self.quantized_tensors():
            if self.form == "bits":
                p_name, n_name, _, _ = self._names(what)
                getattr(self, p_name).clamp_(0.0, 2.0)
                getattr(self, n_name).clamp_(0.0, 2.0)
            elif what == "weight":  # the official code clamps the latent weight, not the latent bias
                self.weight.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def requantize_(
        self,
        maxbit: int = 8,
        threshold: float = 0.0,
        fold_msb: bool = True,
        grow: bool = True,
        shares: str = "recompute",
    ) -> None:
        """`quant(maxbit)` then `pruning(threshold)` (spec §3.1-3.2) on every quantized tensor; `grow` and
        `shares` are the switches bsq.overflow and bsq.prune_shares (see bits.requantize / bits.prune)."""
        for what in self.quantized_tensors():
            planes = B.requantize(self.planes(what), maxbit, grow)
            self._set_planes(what, B.prune(planes, threshold, fold_msb, shares))

    @torch.no_grad()
    def prune_(self, threshold: float = 0.0) -> None:
        """`pruning(threshold)` alone (the step after loading a checkpoint, spec §3.0 / §5.1)."""
        for what in self.quantized_tensors():
            self._set_planes(what, B.prune(self.planes(what), threshold))

    def extra_repr(self) -> str:
        bias = f", bias_nbits={self.bias_nbits}" if self.has_bias else ""
        flags = "" if self.counted else ", counted=False"
        return f"{self._shape_repr()}, nbits={self.nbits}{bias}, form={self.form}{flags}"

    def _shape_repr(self) -> str:
        return str(self.weight_shape)


def conv_arguments(conv: nn.Conv2d) -> tuple:
    """The positional `nn.Conv2d` arguments that rebuild `conv` (quantized twins keep its geometry)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"quantized convolutions support padding_mode='zeros' only, got {conv.padding_mode!r}")
    return (
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )


class BitConv2d(BitLayer):
    """`nn.Conv2d` signature plus `nbits` (and `bias_nbits`); weights in sign-magnitude bit planes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        nbits: int = 8,
        bias_nbits: int | None = None,
    ) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__((out_channels, in_channels // groups, kh, kw), bias, nbits, bias_nbits)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def _apply_weight(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def macs(self, output: torch.Tensor) -> int:
        return conv_macs(self, output)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, nbits: int = 8, bias_nbits: int | None = None) -> BitConv2d:
        layer = cls(*conv_arguments(conv), nbits=nbits, bias_nbits=bias_nbits)
        return layer._init_from_float(conv, nbits, bias_nbits)

    def _empty_float_twin(self) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.has_bias,
            device=self.scale.device,
        )

    def _shape_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}"
        )


class BitLinear(BitLayer):
    """`nn.Linear` signature plus `nbits` (and `bias_nbits`, default = nbits, as the official fc)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        nbits: int = 8,
        bias_nbits: int | None = None,
    ) -> None:
        super().__init__((out_features, in_features), bias, nbits, bias_nbits)
        self.in_features, self.out_features = in_features, out_features

    def _apply_weight(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def macs(self, output: torch.Tensor) -> int:
        return linear_macs(self, output)

    @classmethod
    def from_float(cls, linear: nn.Linear, nbits: int = 8, bias_nbits: int | None = None) -> BitLinear:
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            nbits=nbits,
            bias_nbits=bias_nbits,
        )
        return layer._init_from_float(linear, nbits, bias_nbits)

    def _empty_float_twin(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.has_bias, device=self.scale.device)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def is_bit_layer(module: nn.Module) -> bool:
    return isinstance(module, BitLayer)

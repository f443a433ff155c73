"""FracBits' quantizers and layers (fracbits.md §1.3-1.5, §1.8), also used by the uniform-precision QAT baseline.

- Weights: DoReFa. w~ = tanh(w) / max|tanh(w)|, u = (w~ + 1) / 2, q = Q(u), w_q = 2 q - 1 (symmetric levels without
  a zero level; 0 bits gives exactly 0, which is how a kernel is pruned). No learnable scale: BN absorbs it.
- Activations: PACT on the layer's *input*. x~ = clip(x, 0, |a|) (or [-|a|, |a|] for a signed input), u = x~ / |a|,
  out = |a| Q(u). "sat" (the authors' default) lets autograd see |a| as divisor and multiplier, which is SAT's
  calibrated gradient Q(u) - u; "pact" detaches the rescale (original PACT: d/da = 1 only where clipped).
- Q_k(u) = round((2^k - 1) u) / (2^k - 1) with an identity straight-through backward; Q_0 = a constant z.
- Fractional bits: Q_lam(u) = (1 - f) Q_l(u) + f Q_{l+1}(u), l = min(floor(lam), hi - 1), f = lam - l, lam clamped to
  [lo, hi]. So dL/dlam = <dL/dQ, Q_{l+1} - Q_l>, defined everywhere, at the top of the range too (the spec's fix of
  the official ceil, which loses the gradient at integer lam; `blend="ceil"`, fracbits.blend, gives the official).

A layer is a real `nn.Conv2d` / `nn.Linear` (same state-dict keys for the float weight, so float checkpoints load)
plus its bit-widths `wbits` (lambda_w: one per layer, or one per output kernel) and `abits` (lambda_a), the PACT clip
`act_alpha` and two flags kept as buffers so a checkpoint restores them: `hard` (integer bits, after the FracBits
hard assignment or for uniform QAT) and `signed_input`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bsq.errors import BSQError
from bsq.quant.accounting import FLOAT_BITS, TensorCost, conv_macs, linear_macs, probe
from bsq.quant.convert import float_layers, is_shortcut, set_submodule
from bsq.quant.layers import conv_arguments

__all__ = [
    "FracPolicy",
    "FracLayer",
    "FracConv2d",
    "FracLinear",
    "frac_layers",
    "frac_quantize_model",
    "mark_signed_inputs_",
    "set_hard_model_",
    "clamp_frac_bits_",
    "frac_scheme",
    "round_unit_ste",
    "clamp_bits",
    "frac_quantize_unit",
    "dorefa_weight",
    "pact_activation",
    "pact_integer",
    "MAX_FRAC_BITS",
]

MAX_FRAC_BITS = 16
WEIGHT_ZERO = 0.5  # Q_0 of a weight: 2 * 0.5 - 1 = 0, the pruned kernel (fracbits.md §1.4)
ACT_ZERO = 0.0  # Q_0 of an unsigned activation


# ---- quantizer functions -------------------------------------------------------------------------------------
class _RoundUnit(torch.autograd.Function):
    """round(u s) / s for s = 2^k - 1 > 0, the constant z where k = 0; identity backward (one autograd node)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, steps: torch.Tensor, zero: float) -> torch.Tensor:  # type: ignore[override]
        q = torch.round(u * steps) / steps.clamp_min(1.0)
        return q if zero is None else torch.where(steps > 0, q, torch.full_like(q, zero))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


def round_unit_ste(u: torch.Tensor, bits: torch.Tensor, zero: float) -> torch.Tensor:
    """Q_k(u) on [0, 1] for integer k >= 0 (a tensor broadcastable to u); identity backward to u."""
    steps = (2.0**bits - 1.0).to(u.dtype)
    return _RoundUnit.apply(u, steps, zero if bool((steps == 0).any()) else None)


def clamp_bits(lam: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """lam clamped to [lo, hi] with gradient 1 on the closed range. torch.clamp passes none *at* the bounds, and the
    projection after each step puts lam exactly there, where it would then stay for good."""
    inside = ((lam >= lo) & (lam <= hi)).to(lam.dtype)
    return lam.clamp(lo, hi).detach() + (lam - lam.detach()) * inside


BLENDS = ("floor", "ceil")  # fracbits.blend


def frac_quantize_unit(
    u: torch.Tensor, lam: torch.Tensor, lo: int, hi: int, zero: float, blend: str = "floor"
) -> torch.Tensor:
    """(1 - f) Q_l(u) + f Q_{l+1}(u) with l = min(floor(lam), hi - 1), f = lam - l, lam clamped to [lo, hi].

    blend "ceil" is the authors' (fracbits.md §1.3 pitfall): (1 - f) Q_floor(lam) + f Q_ceil(lam), f = lam -
    floor(lam). The same values everywhere and the same gradients at fractional lam; at an integer lam both terms
    are Q_lam, so the task loss gives lam no gradient there (ours: Q_{l+1} - Q_l)."""
    lam = clamp_bits(lam, lo, hi)
    if blend == "ceil":
        lower, upper = torch.floor(lam).detach(), torch.ceil(lam).detach()
    elif blend == "floor":
        lower = torch.floor(lam).clamp(max=hi - 1).detach()
        upper = lower + 1
    else:
        raise BSQError(f"unknown fracbits blend {blend!r}; use one of {', '.join(BLENDS)}")
    f = lam - lower
    return (1 - f) * round_unit_ste(u, lower, zero) + f * round_unit_ste(u, upper, zero)


def _quantize(
    u: torch.Tensor, lam: torch.Tensor, lo: int, hi: int, hard: bool, zero: float, blend: str = "floor"
) -> torch.Tensor:
    if hard or lo == hi:
        return round_unit_ste(u, lam.detach().round().clamp(lo, hi), zero)
    return frac_quantize_unit(u, lam, lo, hi, zero, blend)


def dorefa_weight(
    w: torch.Tensor, lam: torch.Tensor, lo: int, hi: int, hard: bool, blend: str = "floor"
) -> torch.Tensor:
    """DoReFa weight at (fractional) bits `lam`, broadcast over output kernels (dim 0) when lam is per kernel."""
    t = torch.tanh(w)
    unit = (t / t.abs().max().clamp_min(1e-12) + 1) / 2
    lam = lam.reshape(-1, *([1] * (w.dim() - 1))) if lam.dim() else lam
    return 2 * _quantize(unit, lam, lo, hi, hard, WEIGHT_ZERO, blend) - 1


class _PactInteger(torch.autograd.Function):
    """Unsigned PACT at integer bits in one autograd node: out = |a| round(clip(x, 0, |a|) / |a| s) / s, s = 2^k - 1.

    The same values and gradients as the composed ops (tested against them): dx = g where 0 < x < |a|;
    d|a| = sum g (Q(u) - u) inside plus sum g where clipped (SAT's calibrated gradient) or, for original PACT, the
    clipped sum alone. One node instead of six: the uniform baseline and FracBits' fixed 4-bit inputs run this in
    every layer of every step, where the composition was most of their step-time overhead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, steps: float, calibrated: bool) -> torch.Tensor:  # type: ignore[override]
        a = alpha.abs()
        unit = (x.clamp(min=0) / a).clamp_(max=1)
        q = torch.round(unit * steps).div_(steps)
        ctx.save_for_backward(x, alpha)
        ctx.steps, ctx.calibrated = steps, calibrated
        return q.mul_(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        a = alpha.abs()
        inside = (x > 0) & (x < a)
        clipped = x >= a
        grad_x = grad * inside
        d_alpha = (grad * clipped).sum()
        if ctx.calibrated:
            unit = (x.clamp(min=0) / a).clamp(max=1)
            q = torch.round(unit * ctx.steps) / ctx.steps
            d_alpha = d_alpha + (grad * (q - unit) * inside).sum()
        return grad_x, d_alpha * torch.sign(alpha), None, None


def pact_integer(x: torch.Tensor, alpha: torch.Tensor, bits: int, variant: str) -> torch.Tensor:
    """`pact_activation` of an unsigned input at fixed integer bits >= 1, as one autograd node (the fast path)."""
    return _PactInteger.apply(x, alpha, float(2**bits - 1), variant == "sat")


def pact_activation(
    x: torch.Tensor,
    alpha: torch.Tensor,
    lam: torch.Tensor,
    lo: int,
    hi: int,
    hard: bool,
    signed: bool,
    variant: str,
    blend: str = "floor",
) -> torch.Tensor:
    """PACT clip + (fractional) uniform quantization of an input activation (fracbits.md §1.4)."""
    a = alpha.abs()
    clipped = torch.minimum(torch.maximum(x, -a), a) if signed else torch.minimum(F.relu(x), a)
    scale = a if variant == "sat" else a.detach()
    unit = (clipped / scale + 1) / 2 if signed else clipped / scale
    q = _quantize(unit, lam, lo, hi, hard, WEIGHT_ZERO if signed else ACT_ZERO, blend)
    return (2 * q - 1) * scale if signed else q * scale


# ---- policy ----------------------------------------------------------------------------------------------------
def _bits_range(value, key: str, allow_zero: bool) -> tuple[int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)
    low = 0 if allow_zero else 1
    if not ok or not low <= value[0] <= value[1] <= MAX_FRAC_BITS:
        raise BSQError(
            f"{key} must be [min, max] integer bits with {low} <= min <= max <= {MAX_FRAC_BITS}, got {value!r}"
        )
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class FracPolicy:
    """Which layers get FracBits quantizers, their bit ranges and fixed layers (fracbits.md §1.5 "Fixed layers").

    w_bits / a_bits: [min, max] of the searched weight / input-activation bits (min == max: fixed, e.g. the weight-only
    search with 4-bit activations, or uniform QAT); a_bits None: activations unquantized (the 32-bit regime).
    The first conv keeps `fixed_bits` weights and an unquantized input (counted as 8-bit image in BitOPs); the last
    linear keeps `fixed_bits` weights and a quantized input. The official code searches 1x1 shortcut convs too.
    """

    w_bits: tuple[int, int] = (1, 8)
    a_bits: tuple[int, int] | None = (4, 4)
    granularity: str = "layer"  # layer | kernel (one weight bit-width per output kernel)
    init_bits: float = 4.5  # starting lambda of searched ranges (the configs: target bits + 0.5)
    fixed_bits: int = 8
    quantize_shortcuts: bool = True
    variant: str = "sat"  # sat: calibrated PACT gradient + last-layer weight rescale | pact: original PACT
    hard: bool = False  # start with integer bits (uniform QAT)
    alpha_init: tuple[float, float] = (8.0, 10.0)  # PACT clip of conv / linear inputs (official init)
    blend: str = "floor"  # fracbits.blend: floor (ours) | ceil (the authors', no lam gradient at integer lam)

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_bits", _bits_range(self.w_bits, "w_bits", allow_zero=True))
        if self.a_bits is not None:
            object.__setattr__(self, "a_bits", _bits_range(self.a_bits, "a_bits", allow_zero=False))
        if self.granularity not in ("layer", "kernel"):
            raise BSQError(f"granularity must be layer or kernel, got {self.granularity!r}")
        if self.blend not in BLENDS:
            raise BSQError(f"blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.variant not in ("sat", "pact"):
            raise BSQError(f"variant must be sat or pact, got {self.variant!r}")
        if not isinstance(self.fixed_bits, int) or not 1 <= self.fixed_bits <= MAX_FRAC_BITS:
            raise BSQError(f"fixed_bits must be an integer in 1..{MAX_FRAC_BITS}, got {self.fixed_bits!r}")
        if not isinstance(self.init_bits, (int, float)) or not math.isfinite(self.init_bits):
            raise BSQError(f"init_bits must be a number, got {self.init_bits!r}")
        object.__setattr__(self, "alpha_init", tuple(float(a) for a in self.alpha_init))

    def to_dict(self) -> dict:
        """JSON-ready (lists for ranges), as checkpoints and MLflow store it; FracPolicy(**d) reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ---- layers ----------------------------------------------------------------------------------------------------
class FracLayer:
    """Mixin of FracConv2d / FracLinear: the quantizer state and the quantized forward."""

    form = "frac"
    blend = "floor"  # fracbits.blend of the fractional quantizers (set from the policy)
    counted = True  # every FracBits-quantized layer counts in size and compression (no BSQ-style exceptions)

    @classmethod
    def from_float(
        cls, module: nn.Module, w_range, a_range, kernel_wise: bool, init: float, alpha: float, variant: str
    ):
        """The twin of a float conv / linear: same geometry and weights, bit-widths at `init` (one per output kernel
        when `kernel_wise`), PACT clip at `alpha`."""
        layer = cls(*cls._float_arguments(module), device=module.weight.device)
        with torch.no_grad():
            layer.weight.copy_(module.weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        kernels = module.weight.shape[0] if kernel_wise else 1
        layer._setup(w_range, a_range, kernels, init, alpha, rescale=False, variant=variant)
        return layer

    def _setup(self, w_range, a_range, kernels: int, init: float, alpha: float, rescale: bool, variant: str) -> None:
        self.w_range, self.a_range = tuple(w_range), None if a_range is None else tuple(a_range)
        self.rescale, self.variant = rescale, variant
        dev = self.weight.device
        self.register_buffer("hard", torch.tensor(False, device=dev))
        self.register_buffer("signed_input", torch.tensor(False, device=dev))
        w_init = _start(init, self.w_range)
        self.wbits = nn.Parameter(torch.full((kernels,) if kernels > 1 else (), w_init, device=dev))
        a_init = _start(init, self.a_range) if self.a_range else 32.0
        self.abits = nn.Parameter(torch.tensor(a_init, device=dev))
        self.act_alpha = nn.Parameter(torch.tensor(alpha, device=dev), requires_grad=self.a_range is not None)
        self._sync_flags()

    def _sync_flags(self) -> None:
        """Derive what follows from the flags, whenever they change (set up, hard assignment, load, sign probe).

        The buffers `hard` and `signed_input` carry the flags through state dicts; the forward reads Python mirrors
        (reading a CUDA tensor as a bool would sync the device in every layer of every step). `fixed_input_bits`: the
        input bits once they no longer move (a fixed range, or after the hard assignment), else None. Bit-widths
        train only while searched: a hard layer, fresh or loaded, stays frozen."""
        self.is_hard, self.is_signed = bool(self.hard), bool(self.signed_input)
        self.wbits.requires_grad_(self.searches_weight)
        self.abits.requires_grad_(self.searches_act)
        fixed = self.a_range is not None and not self.searches_act
        self.fixed_input_bits = int(self.rounded_bits()[1]) if fixed else None

    @property
    def searches_weight(self) -> bool:
        return self.w_range[0] < self.w_range[1] and not self.is_hard

    @property
    def searches_act(self) -> bool:
        return self.a_range is not None and self.a_range[0] < self.a_range[1] and not self.is_hard

    @property
    def kernel_wise(self) -> bool:
        return self.wbits.dim() == 1

    def quantizes_input(self) -> bool:
        return self.a_range is not None

    # -- bits as integers (hard assignment, reporting) --
    def rounded_bits(self, offset: float = 0.0) -> tuple[torch.Tensor, float | None]:
        """Integer weight bits (per kernel when kernel-wise) and input bits of round(lambda + offset), clamped."""
        w = (self.wbits.detach() + offset).round().clamp(*self.w_range)
        a = None
        if self.a_range is not None:
            a = float((self.abits.detach() + offset).round().clamp(*self.a_range))
        return w, a

    def weight_bits(self) -> float:
        """Current weight bits as they cost: the integer bits (mean over kernels when kernel-wise)."""
        return float(self.rounded_bits()[0].float().mean())

    def input_bits(self) -> float | None:
        """Input activation bits, or None when the input is not quantized."""
        return self.rounded_bits()[1]

    @torch.no_grad()
    def set_hard_(self, offset: float = 0.0) -> None:
        """FracBits' hard assignment (fracbits.md §1.7): lambda := round(lambda + offset) for good, frozen."""
        w, a = self.rounded_bits(offset)
        self.wbits.copy_(w)
        if a is not None:
            self.abits.fill_(a)
        self.hard.fill_(True)
        self._sync_flags()

    @torch.no_grad()
    def clamp_bits_(self) -> None:
        """Projection of lambda onto its range after each optimizer step."""
        self.wbits.clamp_(*self.w_range)
        if self.a_range is not None:
            self.abits.clamp_(*self.a_range)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_flags()

    # -- forward --
    def quantized_weight(self) -> torch.Tensor:
        w = dorefa_weight(self.weight, self.wbits, *self.w_range, self.is_hard, self.blend)
        if self.rescale:  # SAT on the last layer: quantized weights rescaled to std 1/sqrt(out)
            # The std is a constant to autograd, as in the authors' code (fracbits.md §1.5): only the scale of the
            # logits changes; letting the gradient flow through std(w) would change the fc weight gradient.
            w = w / (math.sqrt(self.weight.shape[0]) * w.std().detach().clamp_min(1e-12))
        return w

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_range is None:
            return x
        x = x.float()  # under bf16 autocast the input may be bf16: quantize in float32
        if self.fixed_input_bits and not self.is_signed:
            return pact_integer(x, self.act_alpha, self.fixed_input_bits, self.variant)
        return pact_activation(
            x, self.act_alpha, self.abits, *self.a_range, self.is_hard, self.is_signed, self.variant, self.blend
        )

    # ---- cost accounting (the QuantizedLayer protocol of bsq.quant.accounting) ----------------------------
    def tensor_costs(self) -> list[TensorCost]:
        """DoReFa counts 2^k levels, sign included (fracbits.md §1.11); a float bias counts 32 bits (FracBits'
        size formula)."""
        bits = self.weight_bits()
        costs = [TensorCost("", self.weight.numel(), bits, bits, True, a_bits=self.input_bits())]
        if self.bias is not None:
            costs.append(TensorCost(".bias", self.bias.numel(), FLOAT_BITS, FLOAT_BITS, True))
        return costs

    def scheme_entries(self) -> dict[str, float]:
        bits = self.weight_bits()
        entries: dict[str, float] = {"": int(bits) if float(bits).is_integer() else round(bits, 4)}
        a = self.input_bits()
        if a is not None:
            entries[".act"] = int(a)
        return entries

    def quantized_params(self) -> tuple[str, ...]:
        return ("weight", "bias")

    def frac_repr(self) -> str:
        act = "float" if self.a_range is None else f"{list(self.a_range)}{' signed' if self.is_signed else ''}"
        mode = "hard" if self.is_hard else "frac"
        return f", w_bits={list(self.w_range)}, a_bits={act}, {mode}{', kernel-wise' if self.kernel_wise else ''}"


def _start(init: float, bounds: tuple[int, int]) -> float:
    return float(min(max(init, bounds[0]), bounds[1]))


class FracConv2d(FracLayer, nn.Conv2d):
    """`nn.Conv2d` with a DoReFa weight and a PACT input quantizer at (fractional) bit-widths."""

    @staticmethod
    def _float_arguments(conv: nn.Conv2d) -> tuple:
        return conv_arguments(conv)

    def macs(self, output: torch.Tensor) -> int:
        return conv_macs(self, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.frac_repr()


class FracLinear(FracLayer, nn.Linear):
    """`nn.Linear` with a DoReFa weight and a PACT input quantizer at (fractional) bit-widths."""

    @staticmethod
    def _float_arguments(linear: nn.Linear) -> tuple:
        return (linear.in_features, linear.out_features, linear.bias is not None)

    def macs(self, output: torch.Tensor) -> int:
        return linear_macs(self, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self.frac_repr() + (", sat-rescale" if self.rescale else "")


# ---- model-level -----------------------------------------------------------------------------------------------
def frac_layers(model: nn.Module) -> Iterator[tuple[str, FracLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, FracLayer):
            yield name, module


def frac_quantize_model(model: nn.Module, policy: FracPolicy) -> nn.Module:
    """Swap every float `Conv2d` / `Linear` for its FracBits twin (in place), following `policy`.

    Call `mark_signed_inputs_` afterwards on a fresh model (a checkpoint restores the flags itself)."""
    candidates = float_layers(model)
    if not candidates:
        raise BSQError("the model has no nn.Conv2d / nn.Linear layers to quantize")
    first, last = candidates[0][0], candidates[-1][0]
    fixed = (policy.fixed_bits, policy.fixed_bits)
    for name, module in candidates:
        if is_shortcut(name) and not policy.quantize_shortcuts:
            continue
        is_linear = isinstance(module, nn.Linear)
        w_range = fixed if name in (first, last) else policy.w_bits
        a_range = None if name == first else policy.a_bits  # the image is not quantized (official weight_only head)
        alpha = policy.alpha_init[1] if is_linear else policy.alpha_init[0]
        kernel_wise = policy.granularity == "kernel" and w_range[0] < w_range[1]
        factory = FracLinear if is_linear else FracConv2d
        layer = factory.from_float(module, w_range, a_range, kernel_wise, policy.init_bits, alpha, policy.variant)
        layer.rescale = policy.variant == "sat" and name == last
        layer.blend = policy.blend
        if policy.hard:
            layer.set_hard_()
        set_submodule(model, name, layer)
    return model


@torch.no_grad()
def mark_signed_inputs_(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, bool]:
    """Which layers' inputs can be negative, from one probe forward of a random input: a ReLU output (or an average
    of ReLU outputs) never is, a linear bottleneck (MobileNet-V2) is. Signed inputs get PACT's two-sided clip
    (the official `double_side`), others the usual [0, |alpha|] one."""
    seen: dict[str, float] = {}
    layers = dict(frac_layers(model))
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=n: seen.__setitem__(name, float(inp[0].min())))
        for n, m in layers.items()
    ]
    probe(model, torch.randn(2, *input_size, device=next(model.parameters()).device), hooks)
    for name, layer in layers.items():
        layer.signed_input.fill_(seen.get(name, 0.0) < 0)
        layer._sync_flags()
    return {name: layer.is_signed for name, layer in layers.items()}


def set_hard_model_(model: nn.Module, offset: float = 0.0) -> None:
    for _, layer in frac_layers(model):
        layer.set_hard_(offset)


def clamp_frac_bits_(model: nn.Module) -> None:
    for _, layer in frac_layers(model):
        layer.clamp_bits_()


def frac_scheme(model: nn.Module) -> dict[str, float]:
    """{layer: weight bits (mean over kernels when kernel-wise), layer.act: input bits} at the current rounding."""
    return {
        f"{name}{suffix}": bits for name, layer in frac_layers(model) for suffix, bits in layer.scheme_entries().items()
    }

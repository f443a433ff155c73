"""The differentiable cost of a DoReFa / PACT (FRAC-form, `bsq.quant.frac`) model as a function of its bit-widths,
and the cost target equal to a measured budget (fracbits.md §1.5-1.6).

Costs are differentiable in the fractional bit-widths lambda (they are bilinear / linear in them, so the official
four-corner blend equals these closed forms exactly):

    BitOPs(lambda) = 1e-9 sum_l MACs_l * mean_o(lambda_w[l, o]) * lambda_a[l]      (G)
    Size(lambda)   = [sum_l P_l * mean_o(lambda_w[l, o]) + 32 * bias entries] / 8e6   (MB)

over the quantized layers. Fixed layers enter with their fixed bits: the first conv's weights at 8 and its (image)
input at the policy's image bits (8), the last linear's weights at 8. Float layers left unquantized (e.g. shortcuts
with quantize_shortcuts off) are not counted in Size (as BSQ's uncounted float shortcuts) and enter BitOPs at 32-bit
weights times their input bits as the BitOPs policy counts them (`bsq.cost`; 32 under every named policy, since a
FracBits model has no activation quantizer outside its layers), exactly as `bsq.metrics` reports them.

Shared arithmetic, used by: FracBits' budget penalty and hard assignment (`bsq.methods.fracbits.cost`), HAWQ-V3's
ILP coefficients and budget (`bsq.methods.hawq.train`), and DNAS' expected cost and target
(`bsq.methods.dnas.cost`, `bsq.methods.dnas.train`). The budget vocabulary (COSTS, MATCHES, matched_cost) is the
torch-free `bsq.budgets`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bsq.budgets import BUDGET_KEYS, COSTS, MATCHES, matched_cost
from bsq.cost import DEFAULT_POLICY, BitopsPolicy, counted_bits
from bsq.cost import policy as bitops_policy
from bsq.errors import BSQError
from bsq.metrics import FLOAT_BITS, trace_layers
from bsq.quant.frac import FracLayer, clamp_bits

__all__ = ["CostModel", "target_from_budget"]


@dataclass
class _Entry:
    name: str
    module: nn.Module
    macs: int
    params: int
    bias: int
    fixed_a: float  # input bits where the layer does not quantize its input (the image, a float activation)


class CostModel:
    """Cost of a FracBits model as a function of its bit-widths (and optionally a rounding offset)."""

    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, ...],
        kind: str,
        policy: str | BitopsPolicy = DEFAULT_POLICY,
    ) -> None:
        if kind not in COSTS:
            raise BSQError(f"fracbits.cost must be one of {COSTS}, got {kind!r}")
        self.kind = kind
        self.policy = bitops_policy(policy)  # the BitOPs convention (bsq.cost): image bits, float layers, W x A
        traces = {t.name: t for t in trace_layers(model, input_size)}
        counted = counted_bits(list(traces.values()), self.policy)
        self.entries = []
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name in traces:
                if counted[name] is None and self.kind == "bitops":
                    continue  # a float layer the policy does not count
                bias = module.bias.numel() if module.bias is not None else 0
                fixed_a = counted[name][1] if counted[name] is not None else float(FLOAT_BITS)
                self.entries.append(_Entry(name, module, traces[name].macs, module.weight.numel(), bias, fixed_a))
        self.first = next((t.name for t in traces.values() if t.image_input), None)
        if not any(isinstance(e.module, FracLayer) for e in self.entries):
            raise BSQError("the model has no FracBits layers: quantize it with frac_quantize_model first")

    def _bits(self, layer: FracLayer, offset: float | None) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(weight bits averaged over kernels, input bits) as tensors of lambda, or rounded with `offset`."""
        if offset is None and not layer.is_hard:
            w = clamp_bits(layer.wbits, *layer.w_range).mean()
            a = clamp_bits(layer.abits, *layer.a_range) if layer.a_range is not None else None
        else:
            rounded_w, rounded_a = layer.rounded_bits(offset or 0.0)
            w, a = rounded_w.float().mean(), rounded_a
        return w, a

    def __call__(self, offset: float | None = None) -> torch.Tensor:
        """The cost now (differentiable in lambda), or of the rounded policy round(lambda + offset) when given."""
        total: torch.Tensor | float = 0.0
        for e in self.entries:
            if isinstance(e.module, FracLayer):
                w, a = self._bits(e.module, offset)
                if self.kind == "size":
                    total = total + (e.params * w + FLOAT_BITS * e.bias) / 8e6
                    continue
                if a is None:
                    a = e.fixed_a
                total = total + 1e-9 * e.macs * w * (a if self.policy.product == "wxa" else 1.0)
            elif self.kind == "bitops":
                total = total + 1e-9 * e.macs * FLOAT_BITS * (e.fixed_a if self.policy.product == "wxa" else 1.0)
        device = next(e.module.weight.device for e in self.entries)
        return torch.as_tensor(total, dtype=torch.float32, device=device)

    @torch.no_grad()
    def uniform_cost(self, bits: float) -> float:
        """Cost when every searched bit-width equals `bits` (clamped to each range): the uniform equivalent."""
        saved = [(layer, layer.wbits.clone(), layer.abits.clone()) for _, layer in self._searched()]
        try:
            for layer, _, _ in saved:
                layer.wbits.fill_(bits)
                layer.abits.fill_(bits)
            return float(self())
        finally:
            for layer, w, a in saved:
                layer.wbits.copy_(w)
                layer.abits.copy_(a)

    def uniform_bits_for(self, target: float) -> float:
        """The (fractional) uniform bit-width whose cost is `target`: `init_bits` = this + 0.5, as the official
        configs (3.5 for the 3-bit-equivalent target). Bisection over the widest searched range."""
        layers = [layer for _, layer in self._searched()]
        if not layers:
            raise BSQError("no layer has a searched bit range; widen fracbits.w_bits (min < max)")
        lo = min(min(layer.w_range[0], (layer.a_range or layer.w_range)[0]) for layer in layers)
        hi = max(max(layer.w_range[1], (layer.a_range or layer.w_range)[1]) for layer in layers)
        c_lo, c_hi = self.uniform_cost(lo), self.uniform_cost(hi)
        if not c_lo <= target <= c_hi:
            hint = " (below the 1-bit floor: fracbits.prune_channels: true allows 0-bit kernels)" if lo >= 1 else ""
            raise BSQError(
                f"the FracBits target {target:g} is outside what the bit ranges can reach ({c_lo:.4g} at {lo} bits to "
                f"{c_hi:.4g} at {hi} bits, {self.unit}){hint}; change the target or fracbits.w_bits / a_bits"
            )
        a, b = float(lo), float(hi)
        for _ in range(60):
            mid = (a + b) / 2
            a, b = (mid, b) if self.uniform_cost(mid) < target else (a, mid)
        return (a + b) / 2

    def _searched(self):
        return [(e.name, e.module) for e in self.entries if isinstance(e.module, FracLayer)]

    @property
    def unit(self) -> str:
        return "MB" if self.kind == "size" else "GBitOPs"


def target_from_budget(budget: dict[str, Any], match: str, cost: CostModel) -> float:
    """The FracBits target equal to a measured budget (a BSQ run's metrics.json): its compression (the same
    average bits over this model's counted weights, hence the same compression column), size (MB) or BitOPs (G),
    the BitOPs counted under this cost model's convention where the record has them (`bitops_g@<policy>`)."""
    if match not in MATCHES:
        raise BSQError(f"fracbits.match must be {', '.join(MATCHES[:-1])} or {MATCHES[-1]}, got {match!r}")
    if cost.kind != matched_cost(match):
        raise BSQError(f"fracbits.match: {match} needs fracbits.cost: {matched_cost(match)}")
    if match == "compression":
        compression = _budget_number(budget, "compression")
        counted = sum(e.params + e.bias for e in cost.entries if isinstance(e.module, FracLayer))
        return FLOAT_BITS / compression * counted / 8e6
    key = BUDGET_KEYS[cost.kind]
    counted_as = f"{key}@{cost.policy.name}"  # the budget's BitOPs under this cost model's convention (bsq.cost)
    return _budget_number(budget, counted_as if cost.kind == "bitops" and counted_as in budget else key)


def _budget_number(budget: dict[str, Any], key: str) -> float:
    """A positive, finite number of the budget file (a BSQ run's metrics.json), or a clear error."""
    if key not in budget:
        raise BSQError(f"the budget file has no {key}; give the metrics.json of a BSQ prune or evaluate run")
    value = budget[key]
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(number) and number > 0):
        raise BSQError(
            f"the budget's {key} must be a number > 0, got {value!r}; give the metrics.json of a finished BSQ prune "
            "or evaluate run (an all-0-bit model has no finite budget)"
        )
    return number

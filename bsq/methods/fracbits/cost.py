"""FracBits' cost models, budget regulariser and hard assignment (fracbits.md §1.5-1.7).

Costs are differentiable in the fractional bit-widths lambda (they are bilinear / linear in them, so the official
four-corner blend equals these closed forms exactly):

    BitOPs(lambda) = 1e-9 sum_l MACs_l * mean_o(lambda_w[l, o]) * lambda_a[l]      (G)
    Size(lambda)   = [sum_l P_l * mean_o(lambda_w[l, o]) + 32 * bias entries] / 8e6   (MB)

over the quantized layers. Fixed layers enter with their fixed bits: the first conv's weights at 8 and its (image)
input at the policy's image bits (8), the last linear's weights at 8. Float layers left unquantized (e.g. shortcuts
with quantize_shortcuts off) are not counted in Size (as BSQ's uncounted float shortcuts) and enter BitOPs at 32-bit
weights times their input bits as the BitOPs policy counts them (`bsq.cost`; 32 under every named policy, since a
FracBits model has no activation quantizer outside its layers), exactly as `bsq.metrics` reports them.
The regulariser is kappa |C - C_t| (official, raw units) or kappa |C / C_t - 1| (normalised, our deviation for small
CIFAR models whose raw gradient is ~45x weaker, §1.6). At the end of the search a global offset delta (official range
[-1, 0], widened when it cannot reach the target) is bisected so that the rounded policy round(lambda + delta) costs
within `tolerance` of the target (§1.7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bsq.cost import DEFAULT_POLICY, BitopsPolicy, counted_bits
from bsq.cost import policy as bitops_policy
from bsq.errors import BSQError
from bsq.methods.fracbits.config import COSTS, MATCHES, matched_cost
from bsq.metrics import FLOAT_BITS, trace_layers
from bsq.quant.frac import FracLayer, clamp_bits, frac_layers

__all__ = ["CostModel", "HardAssignment", "hard_assign", "official_offset", "penalty", "target_from_budget"]

BUDGET_KEYS = {"size": "size_mb", "bitops": "bitops_g"}  # a budget file's metric of each cost


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


def penalty(cost: torch.Tensor, target: float, kappa: float, normalize: bool) -> torch.Tensor:
    """kappa |C - C_t| (official, raw units) or kappa |C / C_t - 1| (normalised): two-sided, not a hinge (§1.6)."""
    return kappa * ((cost / target - 1).abs() if normalize else (cost - target).abs())


@dataclass
class HardAssignment:
    offset: float
    cost: float
    target: float
    trials: list[tuple[float, float]]

    @property
    def relative_error(self) -> float:
        return self.cost / self.target - 1

    def as_metrics(self, tolerance: float) -> dict[str, Any]:
        return {
            "hard_offset": self.offset,
            "hard_cost": self.cost,
            "hard_cost_rel_error": self.relative_error,
            "hard_trials": len(self.trials),
            "budget_met": abs(self.relative_error) <= tolerance,
        }


def official_offset(cost_at, target: float, tolerance: float = 0.01, trials: int = 10) -> float:
    """The authors' offset search (deJQK/FracBits train.py, at `hard_assign_epoch`): bisect in [-1, 0] from 0,
    at most `trials` halvings, stop once the cost is within `tolerance` of the target, and keep the LAST offset
    tried (not the closest). Under budget at 0 it stays at 0 (lower = higher = 0); far over budget it ends just
    above -1. `cost_at(delta)` gives the rounded policy's cost at offset delta."""
    lower, higher, delta = -1.0, 0.0, 0.0
    c = cost_at(delta)
    for _ in range(trials):
        if c - target > tolerance * target:
            higher = delta
        elif c - target < -tolerance * target:
            lower = delta
        else:
            break
        delta = (higher + lower) / 2
        c = cost_at(delta)
    return delta


@torch.no_grad()
def hard_assign(
    model: nn.Module,
    cost: CostModel,
    target: float,
    tolerance: float = 0.01,
    trials: int = 10,
    bisection: str = "extended",
) -> HardAssignment:
    """Bisect one global offset delta, starting at 0, until round(lambda + delta) costs within `tolerance`
    (relative) of `target`, then freeze every layer at those integer bits (fracbits.md §1.7).

    The official search bisects in [-1, 0]: it assumes the search brought the cost close and only lowers bits when
    the rounded policy costs too much. We keep that first step and bracket further only when it cannot reach the
    target: below -1 when even round(lambda - 1) costs too much (the search stalled above budget, as FracBits does
    under ~1 bit per weight), above 0 when the rounded policy falls short. So the frozen policy meets the budget
    and the tables compare at equal cost (our deviation; the metrics record the offset and every trial). The cost
    is monotone in delta. If no trial lands within tolerance (a big layer's one-bit step jumps over the window),
    the closest trial at or under the target is kept, else the closest. `bisection="official"` is the authors'
    search exactly (`official_offset`: [-1, 0] only, the last trial kept), switch `fracbits.bisection`."""
    span = max(max(layer.w_range[1], (layer.a_range or (0, 0))[1]) for _, layer in frac_layers(model))
    tried: list[tuple[float, float]] = []

    def at(delta: float) -> float:
        c = float(cost(offset=delta))
        tried.append((delta, c))
        return c

    def close(c: float) -> bool:
        return abs(c - target) <= tolerance * target

    def bisect(lo: float, hi: float, steps: int) -> None:
        for _ in range(steps):
            mid = (lo + hi) / 2
            c = at(mid)
            if close(c):
                return
            lo, hi = (lo, mid) if c > target else (mid, hi)

    if bisection == "official":
        delta = official_offset(at, target, tolerance, trials)
        return _freeze(model, cost, delta, next(c for d, c in reversed(tried) if d == delta), target, tried)
    if bisection != "extended":
        raise BSQError(f"fracbits.bisection must be extended or official, got {bisection!r}")
    c = at(0.0)
    if not close(c):
        over = c > target
        sign = -1.0 if over else 1.0
        bisect(*sorted((0.0, sign)), max(1, trials) - 1)  # the official search (over budget: [-1, 0])
        if not any(close(t) or (t > target) != over for _, t in tried):  # the target lies beyond +-1: bracket it
            inner, outer = sign, sign
            while not close(c := at(outer)) and (c > target) == over and abs(outer) < span:
                inner, outer = outer, 2 * outer
            if not close(c) and (c > target) != over:
                bisect(*sorted((inner, outer)), max(1, trials))
    within = [t for t in tried if close(t[1])]
    under = [t for t in tried if t[1] <= target]
    pool = within or under or tried
    delta, c = min(pool, key=lambda t: abs(t[1] - target))
    return _freeze(model, cost, delta, c, target, tried)


def _freeze(
    model: nn.Module, cost: CostModel, delta: float, c: float, target: float, tried: list[tuple[float, float]]
) -> HardAssignment:
    """Every layer at round(lambda + delta), checked to cost what its trial did."""
    for _, layer in frac_layers(model):
        layer.set_hard_(delta)
    final = float(cost())
    if not math.isclose(final, c, rel_tol=1e-6, abs_tol=1e-12):
        raise AssertionError(f"hard assignment cost {final} differs from its trial {c}")
    return HardAssignment(delta, final, target, tried)


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

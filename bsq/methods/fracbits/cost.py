"""FracBits' budget regulariser and hard assignment (fracbits.md §1.6-1.7).

The cost model itself, differentiable in the fractional bit-widths lambda, and the target equal to a measured budget
are shared with HAWQ-V3 and DNAS: `bsq.quant.frac_cost` (`CostModel`, `target_from_budget`, re-exported here).
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

from bsq.errors import BSQError
from bsq.quant.frac import frac_layers
from bsq.quant.frac_cost import CostModel, target_from_budget

__all__ = ["CostModel", "HardAssignment", "hard_assign", "official_offset", "penalty", "target_from_budget"]


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

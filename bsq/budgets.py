"""The budget vocabulary shared by the methods that search to a cost target (torch-free).

A run matched to a budget (a BSQ run's metrics.json) names what it matches (`MATCHES`: compression, size in MB or
BitOPs in G) and which cost it regularises or constrains (`COSTS`: size or BitOPs); `matched_cost(match)` is the
cost a match needs, and `BUDGET_KEYS` the metric a budget file records for each cost. FracBits' and DNAS' config
sections use these (and `bsq.quant.frac_cost.target_from_budget`, FracBits' and HAWQ-V3's and DNAS' target); the
BitOPs conventions themselves are `bsq.cost`'s.

`clamp_matched` is what a method does with a matched target it cannot reach (`MatchedTarget`): an explicit target is
the user's and an unreachable one is an error, but a matched one is a BSQ run's measurement (alpha 2e-2 reaches 0.87
average bits, below a 1-bit floor) and failing on it would fail the whole comparison on a point nobody mistyped.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsq.errors import BSQError

__all__ = [
    "COSTS",
    "MATCHES",
    "BUDGET_KEYS",
    "matched_cost",
    "MatchedTarget",
    "clamp_matched",
    "read_budget",
    "budget_labels",
]

log = logging.getLogger("bsq")

COSTS = ("size", "bitops")  # MB of weights | G BitOPs (weights x activations)
MATCHES = ("compression", "size", "bitops")  # what a budget input's metrics are matched on
BUDGET_KEYS = {"size": "size_mb", "bitops": "bitops_g"}  # a budget file's metric of each cost


def matched_cost(match: str) -> str:
    """The cost a run matched to a budget must regularise: compression and size match a size target."""
    return "bitops" if match == "bitops" else "size"


@dataclass(frozen=True)
class MatchedTarget:
    """A target and the range a method can reach: `requested` is the cost asked for (the BSQ run's, what budget_met
    is judged against), `used` the one the search runs at (`requested` clamped into [floor, ceiling])."""

    requested: float
    used: float
    floor: float
    ceiling: float | None = None

    @property
    def reachable(self) -> bool:
        return self.used == self.requested

    def metrics(self) -> dict[str, Any]:
        """budget_reachable, and where it is false the target used and the reachable range (for the tables' flag
        and for a reader asking why the run missed its budget)."""
        if self.reachable:
            return {"budget_reachable": True}
        bounds = {"budget_floor": self.floor, **({"budget_ceiling": self.ceiling} if self.ceiling is not None else {})}
        return {"target_used": self.used, "budget_reachable": False, **bounds}


def clamp_matched(requested: float, floor: float, ceiling: float | None, unit: str, method: str) -> MatchedTarget:
    """A matched target moved to the nearest reachable cost, with a warning naming both: the run goes on, its
    budget_met judged against the requested cost (a miss flagged as FracBits' is), instead of failing the workflow
    on a BSQ point outside the method's range."""
    used = min(max(requested, floor), math.inf if ceiling is None else ceiling)
    if used != requested:
        side = "below the smallest" if used > requested else "above the largest"
        log.warning(
            "%s: the matched budget %.6g %s is %s reachable cost; running at %.6g %s (budget_met is judged against "
            "the budget)",
            method,
            requested,
            unit,
            side,
            used,
            unit,
        )
    return MatchedTarget(requested, used, floor, ceiling)


def read_budget(path: str | Path, method: str) -> dict[str, Any]:
    """A BSQ run's metrics.json given as `method`'s budget input (the workflow's matched runs: its cost becomes the
    method's target), checked to be a JSON object."""
    try:
        budget = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BSQError(f"cannot read the {method} budget {path}: {exc}. Give a BSQ run's metrics.json.") from exc
    if not isinstance(budget, dict):
        raise BSQError(f"{path} is not a metrics.json (a JSON object of metrics)")
    return budget


def budget_labels(budget: dict[str, Any] | None, match: str | None) -> dict[str, Any]:
    """The labels of a run matched to a budget: whose run it matches (`budget_of`), on what (`match`) and, for a BSQ
    run, at which alpha, so tables line it up with that run's row. Empty for an explicit target."""
    if budget is None:
        return {}
    source = budget.get("labels", {})
    labels: dict[str, Any] = {"budget_of": source.get("method", "bsq"), "match": match}
    if "alpha" in source:
        labels["alpha"] = source["alpha"]
    return labels

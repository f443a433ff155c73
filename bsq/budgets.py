"""The budget vocabulary shared by the methods that search to a cost target (torch-free).

A run matched to a budget (a BSQ run's metrics.json) names what it matches (`MATCHES`: compression, size in MB or
BitOPs in G) and which cost it regularises or constrains (`COSTS`: size or BitOPs); `matched_cost(match)` is the
cost a match needs, and `BUDGET_KEYS` the metric a budget file records for each cost. FracBits' and DNAS' config
sections use these (and `bsq.quant.frac_cost.target_from_budget`, FracBits' and HAWQ-V3's and DNAS' target); the
BitOPs conventions themselves are `bsq.cost`'s.
"""

from __future__ import annotations

__all__ = ["COSTS", "MATCHES", "BUDGET_KEYS", "matched_cost"]

COSTS = ("size", "bitops")  # MB of weights | G BitOPs (weights x activations)
MATCHES = ("compression", "size", "bitops")  # what a budget input's metrics are matched on
BUDGET_KEYS = {"size": "size_mb", "bitops": "bitops_g"}  # a budget file's metric of each cost


def matched_cost(match: str) -> str:
    """The cost a run matched to a budget must regularise: compression and size match a size target."""
    return "bitops" if match == "bitops" else "size"

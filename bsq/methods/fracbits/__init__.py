"""FracBits (Yang & Jin, AAAI 2021): fractional bit-widths pulled to a cost target, a hard assignment and a finetune,
in one run (the official schedule, fracbits.md §1.7). The workflow runs it at each BSQ run's measured cost
(`fracbits.match`) and at explicit targets (`fracbits.targets`).

Torch-free: this module declares the method; `cost.py` holds its cost model and hard assignment, `train.py` its
stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.errors import BSQError
from bsq.methods.base import Flag, Method, Point, StageSpec, budgeted_points
from bsq.methods.fracbits.config import COSTS, MATCHES, FracBitsConfig, matched_cost
from bsq.methods.qat import QAT_RECIPE, QATConfig

__all__ = ["METHOD", "FracBitsConfig", "COSTS", "MATCHES", "matched_cost"]


def _settings(workflow: Mapping[str, Any]) -> Mapping[str, Any]:
    return workflow.get("fracbits") or {}


def points(workflow: Mapping[str, Any]) -> list[Point]:
    """One run per BSQ alpha at that run's measured cost (`fracbits.match`), plus one per explicit target."""
    match = _settings(workflow).get("match")
    matched = {"fracbits": {"match": match, "cost": matched_cost(match)}} if match else None
    return budgeted_points("fracbits", workflow, matched, lambda t: {"fracbits": {"target": t}})


def _check_workflow(workflow: Mapping[str, Any]) -> None:
    if not points(workflow):
        raise BSQError(
            "methods has fracbits but nothing sets its targets: keep bsq in methods with fracbits.match (one FracBits "
            "run per alpha at that run's cost), or give fracbits.targets"
        )
    match = _settings(workflow).get("match")
    stages = workflow.get("stages") or {}
    cost = None
    for section in ("common", "fracbits"):  # the later section wins, as when the stage config is merged
        cost = ((stages.get(section) or {}).get("fracbits") or {}).get("cost", cost)
    if match and cost not in (None, matched_cost(match)):
        raise BSQError(
            f"fracbits.match: {match} needs stages.fracbits.fracbits.cost: {matched_cost(match)}, got {cost} (from "
            "stages.fracbits or stages.common); change one of them"
        )


METHOD = Method(
    name="fracbits",
    summary="FracBits: fractional bit-widths to a cost target, hard assignment, finetune in one run (AAAI 2021)",
    sections={"fracbits": FracBitsConfig, "qat": QATConfig},
    stages=(
        StageSpec(
            "fracbits",
            "bsq.methods.fracbits.train:run",
            ("checkpoint", "scheme", "metrics", "history", "run"),
            QAT_RECIPE,
            2,  # a search epoch and a finetune epoch
            optional_inputs=("budget",),
            check=lambda cfg: cfg.fracbits.search_epochs_of(cfg.optim.epochs),  # a search and a finetune epoch
            help="FracBits baseline: fractional bits to a cost target, hard assignment, finetune",
            flags=(
                Flag(
                    "--budget",
                    "metrics.json of a BSQ run: match its cost (fracbits.match, compression)",
                    input="budget",
                ),
                Flag(
                    "--target",
                    "fracbits.target, in MB (cost: size) or GBitOPs (cost: bitops)",
                    key="fracbits.target",
                    type=float,
                ),
            ),
        ),
    ),
    evaluated=("finetune",),
    points=points,
    check_workflow=_check_workflow,
    workflow_keys={
        "fracbits.target": "FracBits targets come from `fracbits.targets` and, matched to BSQ, `fracbits.match`",
        "fracbits.match": "the matched cost comes from the top-level `fracbits.match`",
    },
)

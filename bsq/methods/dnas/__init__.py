"""DNAS / EdMIPS (Wu et al., arXiv 1812.00090; Cai & Vasconcelos, CVPR 2020, github zhaoweicai/EdMIPS): a
differentiable search over per-layer candidate bit-widths, argmax, and a finetune of the derived scheme, in one run
(methods-next.md "DNAS and EdMIPS"). The workflow runs it at each BSQ run's measured cost (`dnas.match`) and at
explicit targets (`dnas.targets`), as FracBits.

Torch-free: this module declares the method; `supernet.py` holds the mixed layers, `cost.py` the expected cost,
`train.py` the stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.errors import BSQError
from bsq.methods.base import Flag, Method, Point, StageSpec, budgeted_points
from bsq.methods.dnas.config import DnasConfig, matched_cost
from bsq.methods.qat import QAT_RECIPE, QATConfig

__all__ = ["METHOD", "DnasConfig", "FORMS"]

# training form of the search's resume files -> its builder (the lead's Method.forms; the final model is Form.FRAC)
FORMS = {"dnas": "bsq.methods.dnas.supernet:build"}


def _settings(workflow: Mapping[str, Any]) -> Mapping[str, Any]:
    return workflow.get("dnas") or {}


def points(workflow: Mapping[str, Any]) -> list[Point]:
    """One run per BSQ alpha at that run's measured cost (`dnas.match`), plus one per explicit target."""
    match = _settings(workflow).get("match")
    matched = {"dnas": {"match": match, "cost": matched_cost(match)}} if match else None
    return budgeted_points("dnas", workflow, matched, lambda t: {"dnas": {"target": t}})


def _check_workflow(workflow: Mapping[str, Any]) -> None:
    if not points(workflow):
        raise BSQError(
            "methods has dnas but nothing sets its targets: keep bsq in methods with dnas.match (one DNAS run per "
            "alpha at that run's cost), or give dnas.targets"
        )
    match = _settings(workflow).get("match")
    stages = workflow.get("stages") or {}
    section: dict[str, Any] = {}
    for name in ("common", "dnas"):  # the later section wins, as when the stage config is merged
        section.update((stages.get(name) or {}).get("dnas") or {})
    cost = section.get("cost")
    if match and cost not in (None, matched_cost(match)):
        raise BSQError(
            f"dnas.match: {match} needs stages.dnas.dnas.cost: {matched_cost(match)}, got {cost} (from stages.dnas "
            "or stages.common); change one of them"
        )
    if section.get("complexity") == "edmips":
        raise BSQError(
            "stages.dnas.dnas.complexity: edmips ignores the workflow's budgets (dnas.match / dnas.targets); the "
            "workflow runs DNAS at equal cost with complexity: target"
        )
    # the candidate set, lam, holdout, ... are checked here too, before any job starts
    DnasConfig(**{k: v for k, v in section.items() if k in DnasConfig.__dataclass_fields__})


METHOD = Method(
    name="dnas",
    summary="DNAS / EdMIPS: differentiable search over candidate bit-widths, argmax, finetune in one run",
    sections={"dnas": DnasConfig, "qat": QATConfig},
    stages=(
        StageSpec(
            "dnas",
            "bsq.methods.dnas.train:run",
            ("checkpoint", "scheme", "metrics", "history", "run"),
            QAT_RECIPE,  # the FracBits / uniform recipe, so the baselines share epochs and optimiser
            2,  # a search epoch and a finetune epoch
            optional_inputs=("budget",),
            check=lambda cfg: cfg.dnas.search_epochs_of(cfg.optim.epochs),
            help="DNAS / EdMIPS baseline: differentiable bit-width search, argmax, finetune",
            flags=(
                Flag("--budget", "metrics.json of a BSQ run: match its cost (dnas.match, compression)", input="budget"),
                Flag(
                    "--target",
                    "dnas.target, in MB (cost: size) or GBitOPs (cost: bitops)",
                    key="dnas.target",
                    type=float,
                ),
            ),
        ),
    ),
    evaluated=("finetune",),
    points=points,
    check_workflow=_check_workflow,
    forms=FORMS,
    workflow_keys={
        "dnas.target": "DNAS targets come from `dnas.targets` and, matched to BSQ, `dnas.match`",
        "dnas.match": "the matched cost comes from the top-level `dnas.match`",
    },
)

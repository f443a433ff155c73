"""HAWQ-V3-style allocation (Yao, Dong et al., ICML 2021; methods-next.md "HAWQ-V3", code Zhen-Dong/HAWQ): Hessian
traces of the float model, sensitivity Omega_l(b) = Tr(H_l) / n_l ||Q_b(W_l) - W_l||^2, an integer linear program
choosing one bit-width per layer under a size or BitOPs budget, then QAT with the scheme fixed, in one run. The
workflow runs it at each BSQ run's measured cost (`hawq.match`) and at explicit targets (`hawq.targets`).

Torch-free: this module declares the method; `ilp.py` holds the program, `sensitivity.py` Omega, `train.py` the stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.errors import BSQError
from bsq.methods.base import Flag, Method, Point, StageSpec, budgeted_points
from bsq.methods.hawq.config import COSTS, MATCHES, HAWQConfig, check_candidates, matched_cost
from bsq.methods.qat import QAT_RECIPE, QATConfig

__all__ = ["METHOD", "HAWQConfig"]


def _settings(workflow: Mapping[str, Any]) -> Mapping[str, Any]:
    return workflow.get("hawq") or {}


def points(workflow: Mapping[str, Any]) -> list[Point]:
    """One run per BSQ alpha at that run's measured cost (`hawq.match`), plus one per explicit target in
    `hawq.cost` (size: MB, bitops: G)."""
    settings = _settings(workflow)
    match, cost = settings.get("match"), settings.get("cost", "size")
    matched = {"hawq": {"match": match, "cost": matched_cost(match)}} if match else None
    return budgeted_points("hawq", workflow, matched, lambda t: {"hawq": {"target": t, "cost": cost}})


def _check_workflow(workflow: Mapping[str, Any]) -> None:
    settings = _settings(workflow)
    if settings.get("match") not in (None, *MATCHES):
        raise BSQError(f"hawq.match must be one of {', '.join(MATCHES)} or null, got {settings.get('match')!r}")
    if settings.get("cost", "size") not in COSTS:
        raise BSQError(f"hawq.cost must be one of {', '.join(COSTS)}, got {settings.get('cost')!r}")
    if not points(workflow):
        raise BSQError(
            "methods has hawq but nothing sets its targets: keep bsq in methods with hawq.match (one HAWQ run per "
            "alpha at that run's cost), or give hawq.targets"
        )
    stages = workflow.get("stages") or {}
    for section in ("common", "hawq"):  # config-time checks of the stage settings, before any job
        overrides = (stages.get(section) or {}).get("hawq") or {}
        if "candidates" in overrides:
            check_candidates(overrides["candidates"], f"stages.{section}.hawq.candidates")
        for key in ("samples", "hessian_batches"):
            value = overrides.get(key, 1)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise BSQError(f"stages.{section}.hawq.{key} must be an integer >= 1, got {value!r}")


METHOD = Method(
    name="hawq",
    summary="HAWQ-V3: Hessian-trace sensitivity, ILP bit allocation under a size / BitOPs budget, QAT (ICML 2021)",
    sections={"hawq": HAWQConfig, "qat": QATConfig},
    stages=(
        StageSpec(
            "hawq",
            "bsq.methods.hawq.train:run",
            ("checkpoint", "scheme", "metrics", "history", "run", "hessian"),
            QAT_RECIPE,  # the finetune: uniform QAT's recipe (the authors' ImageNet recipe is not for CIFAR)
            optional_inputs=("budget",),
            help="HAWQ-V3 baseline: Hessian traces, ILP bit allocation to a budget, QAT finetune",
            flags=(
                Flag(
                    "--budget",
                    "metrics.json of a BSQ run: match its cost (hawq.match, compression)",
                    input="budget",
                ),
                Flag(
                    "--target",
                    "hawq.target, in MB (hawq.cost: size) or GBitOPs (hawq.cost: bitops)",
                    key="hawq.target",
                    type=float,
                ),
            ),
        ),
    ),
    evaluated=("finetune",),
    points=points,
    check_workflow=_check_workflow,
    workflow_keys={
        "hawq.target": "HAWQ targets come from `hawq.targets` and, matched to BSQ, `hawq.match`",
        "hawq.match": "the matched cost comes from the top-level `hawq.match`",
        "hawq.cost": "the cost comes from the top-level `hawq.match` (matched runs) or `hawq.cost` (targets)",
    },
)

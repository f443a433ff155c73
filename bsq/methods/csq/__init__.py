"""CSQ (Xiao, Yang, Dong, Keutzer, Du, Zhang; DAC 2023; code github lawsonX/CSQ): bit planes and per-bit-position
gates relaxed by a rising temperature, a budget-aware regulariser that prunes and grows precision toward a target
average bit-width, gates hardened at the ticket epoch, the exact model exported to BSQ's bit layers, in one run.
The workflow runs it at each BSQ run's measured cost (`csq.match`) and at explicit targets (`csq.targets`).

Torch-free: this module declares the method; `config.py` holds its section and schedule, `layers.py` its layers,
`budget.py` its regulariser, `train.py` its stage (methods-next.md CSQ)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.errors import BSQError
from bsq.methods.base import Flag, Method, Point, StageSpec, budgeted_points
from bsq.methods.csq.config import MATCHES, CSQConfig

__all__ = ["METHOD", "CSQConfig", "CSQ_RECIPE", "FORMS"]

# main_cifar.py / README CIFAR-10 recipe: SGD momentum 0.9, wd 5e-4, lr 0.1, cosine (CosineAnnealingWarmRestarts with
# --t0 1 is one cosine over the run), 600 epochs. Not reproduced: the 5-epoch linear warm-up (--warmup; the suite's
# schedules have none) and the per-round cosine restarts of the ImageNet script (ours is one cosine over the run).
CSQ_RECIPE = {"epochs": 600, "lr": 0.1, "schedule": "cosine", "momentum": 0.9, "weight_decay": 5e-4}
FORMS = {"csq": "bsq.methods.csq.layers:build"}  # the training form of resume files (Method.forms)


def _settings(workflow: Mapping[str, Any]) -> Mapping[str, Any]:
    return workflow.get("csq") or {}


def points(workflow: Mapping[str, Any]) -> list[Point]:
    """One run per BSQ alpha at that run's measured cost (`csq.match`, gates weighted by layer size so the average
    bits land on the accountant's), plus one per explicit target (average bits)."""
    match = _settings(workflow).get("match")
    matched = {"csq": {"match": match, "share": "params"}} if match else None
    return budgeted_points("csq", workflow, matched, lambda t: {"csq": {"target": t}})


def _check_workflow(workflow: Mapping[str, Any]) -> None:
    match = _settings(workflow).get("match")
    if match is not None and match not in MATCHES:
        raise BSQError(f"csq.match must be one of {', '.join(MATCHES)} or null, got {match!r}")
    if not points(workflow):
        raise BSQError(
            "methods has csq but nothing sets its targets: keep bsq in methods with csq.match (one CSQ run per "
            "alpha at that run's cost), or give csq.targets (average bits)"
        )
    for t in _settings(workflow).get("targets", []):
        CSQConfig(target=float(t), **_nbits(workflow))  # a target outside (0, N] fails here, before any job


def _nbits(workflow: Mapping[str, Any]) -> dict[str, Any]:
    stages = workflow.get("stages") or {}
    nbits = None
    for section in ("common", "csq"):  # the later section wins, as when the stage config is merged
        nbits = ((stages.get(section) or {}).get("csq") or {}).get("nbits", nbits)
    return {} if nbits is None else {"nbits": nbits}


METHOD = Method(
    name="csq",
    summary="CSQ: gated bit planes under a rising temperature, budget-aware regulariser, hardened at the ticket "
    "(DAC 2023)",
    sections={"csq": CSQConfig},
    stages=(
        StageSpec(
            "csq",
            "bsq.methods.csq.train:run",
            ("checkpoint", "scheme", "metrics", "history", "run"),
            CSQ_RECIPE,
            2,  # a soft-gate epoch and a hard-gate epoch
            optional_inputs=("budget",),
            check=lambda cfg: cfg.csq.schedule(cfg.optim.epochs),
            reads=("csq", "quant"),
            help="CSQ: gated bit planes to a target average bit-width, hardened at the ticket, exported to bits",
            flags=(
                Flag("--budget", "metrics.json of a BSQ run: match its cost (csq.match, compression)", input="budget"),
                Flag("--target", "csq.target, average weight bits in (0, csq.nbits]", key="csq.target", type=float),
            ),
        ),
    ),
    evaluated=("finetune",),
    points=points,
    check_workflow=_check_workflow,
    workflow_keys={
        "csq.target": "CSQ targets come from `csq.targets` and, matched to BSQ, `csq.match`",
        "csq.match": "the matched cost comes from the top-level `csq.match`",
    },
    forms=FORMS,
)

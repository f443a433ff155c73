"""MSQ (Han, Yoon, Kim, Wang, Jeon, Yang, Ko; ICCV 2025, arXiv 2507.22349), a labelled reconstruction: no public
code exists, so every choice the abstract does not pin down is a switch (`config.py`, methods-next.md MSQ).

One stage: float weights with a round-clamp LSB quantizer (`bsq.quant.lsb`), an L1 regulariser on the LSB residuals,
periodic Hessian-guided multi-LSB pruning to a cost target, then a finetune with the bits fixed; the final model is
exported to BSQ's bit form. The workflow runs it at each BSQ run's measured cost (`msq.match`) and at explicit
targets (`msq.targets`, in the unit of `msq.match`).

Torch-free: this module declares the method; `layers.py`, `prune.py` and `train.py` run it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.errors import BSQError
from bsq.methods.base import Flag, Method, Point, StageSpec, budgeted_points
from bsq.methods.msq.config import MATCHES, MSQConfig

__all__ = ["METHOD", "MSQConfig", "MATCHES", "MSQ_RECIPE"]

# No verified recipe (the paper's training details are not in the abstract): ours, the one-run recipe of the suite's
# QAT baselines (200 epochs, SGD momentum 0.9, lr 0.05 cosine: float weights trained from the float model, as
# FracBits and uniform QAT do; a cosine schedule shortens with optim.epochs), wd 1e-4 as BSQ's. msq.lam was measured
# with lr 0.05 (the regulariser's step is lr x lambda).
MSQ_RECIPE = {"epochs": 200, "lr": 0.05, "schedule": "cosine", "weight_decay": 1e-4}


def _settings(workflow: Mapping[str, Any]) -> Mapping[str, Any]:
    return workflow.get("msq") or {}


def points(workflow: Mapping[str, Any]) -> list[Point]:
    """One run per BSQ alpha at that run's measured cost (`msq.match`), plus one per explicit target (in the unit of
    `msq.match`, compression when it is null); every point is labelled a reconstruction."""
    match = _settings(workflow).get("match", "compression")
    matched = {"msq": {"match": match}} if match else None
    explicit = match or "compression"
    return budgeted_points(
        "msq",
        workflow,
        matched,
        lambda t: {"msq": {"target": t, "match": explicit}},
        labels={"reconstruction": "true"},
        label_targets=True,
    )


def _check_workflow(workflow: Mapping[str, Any]) -> None:
    if not points(workflow):
        raise BSQError(
            "methods has msq but nothing sets its targets: keep bsq in methods with msq.match (one MSQ run per "
            "alpha at that run's cost), or give msq.targets"
        )
    match = _settings(workflow).get("match", "compression")
    if match not in (*MATCHES, None):
        raise BSQError(f"msq.match must be one of {', '.join(MATCHES)} or null, got {match!r}")


METHOD = Method(
    name="msq",
    summary=(
        "MSQ (reconstruction): round-clamp LSB quantizer on float weights, L1 LSB regulariser, Hessian-guided "
        "multi-LSB pruning to a cost target, finetune (ICCV 2025; no public code, choices labelled)"
    ),
    sections={"msq": MSQConfig},
    stages=(
        StageSpec(
            "msq",
            "bsq.methods.msq.train:run",
            ("checkpoint", "scheme", "metrics", "history", "run"),
            MSQ_RECIPE,
            2,  # a pruning epoch and a finetune epoch
            optional_inputs=("budget",),
            check=lambda cfg: cfg.msq.prune_end(cfg.optim.epochs),
            help="MSQ (reconstruction): LSB regulariser, Hessian-guided LSB pruning to a target, finetune",
            flags=(
                Flag(
                    "--budget",
                    "metrics.json of a BSQ run: match its cost (msq.match, compression)",
                    input="budget",
                ),
                Flag(
                    "--target",
                    "msq.target, in the unit of msq.match (compression x, size MB, bitops G)",
                    key="msq.target",
                    type=float,
                ),
            ),
        ),
    ),
    evaluated=("finetune",),
    points=points,
    check_workflow=_check_workflow,
    workflow_keys={
        "msq.target": "MSQ targets come from `msq.targets` and, matched to BSQ, `msq.match`",
        "msq.match": "the matched cost comes from the top-level `msq.match`",
    },
    forms={"msq": "bsq.methods.msq.layers:build"},
)

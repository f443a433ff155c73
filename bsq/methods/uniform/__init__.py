"""Uniform-precision QAT: every layer at `qat.bits` weight bits with FracBits' quantizers (DoReFa weights, PACT
inputs), trained from the float model with the same recipe: the PACT / DoReFa / LQ-Nets rows of the papers' tables
on the same data, model, seed and epochs as BSQ and FracBits.

Torch-free: this module declares the method; `train.py` runs its stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.errors import BSQError
from bsq.methods.base import Flag, Method, Point, StageSpec
from bsq.methods.qat import QAT_RECIPE, QATConfig

__all__ = ["METHOD"]


def points(workflow: Mapping[str, Any]) -> list[Point]:
    """One run per `uniform_bits` value."""
    return [
        Point("uniform", f"bits-{int(b)}", {"qat": {"bits": int(b)}}, {"bits": str(int(b))})
        for b in workflow.get("uniform_bits", [])
    ]


def _check_workflow(workflow: Mapping[str, Any]) -> None:
    if not workflow.get("uniform_bits"):
        raise BSQError("methods has uniform but uniform_bits is empty; give the bit-widths, e.g. [2, 3, 4, 8]")


METHOD = Method(
    name="uniform",
    summary="Uniform QAT: every layer at the same bits, FracBits' quantizers and recipe (the PACT / DoReFa rows)",
    sections={"qat": QATConfig},  # shared with FracBits: the same quantizers
    stages=(
        StageSpec(
            "uniform",
            "bsq.methods.uniform.train:run",
            ("checkpoint", "scheme", "metrics", "history", "run"),
            QAT_RECIPE,
            help="uniform-precision QAT baseline (DoReFa weights, PACT activations)",
            flags=(
                Flag(
                    "--bits",
                    "qat.bits: weight bits of every layer but the first and the last",
                    key="qat.bits",
                    type=int,
                ),
            ),
        ),
    ),
    evaluated=("finetune",),
    points=points,
    check_workflow=_check_workflow,
    workflow_keys={"qat.bits": "uniform QAT's bits come from `uniform_bits` (one run per value)"},
)

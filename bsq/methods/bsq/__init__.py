"""BSQ (Yang et al., ICLR 2021): bit-plane search with a bit-level group-lasso penalty (search), the final
re-quantization that fixes the scheme (prune), and finetuning with the scheme frozen (finetune; `scratch` is the
same stage from the float model: the paper's train-from-scratch baseline).

Torch-free: this module declares the method; `search.py`, `prune.py` and `finetune.py` run its stages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bsq.errors import BSQError
from bsq.methods.base import Flag, Method, Point, StageSpec
from bsq.methods.bsq.config import BSQConfig, FinetuneConfig

__all__ = ["METHOD", "BSQConfig", "FinetuneConfig", "alpha_points", "spelling"]

# Paper recipes (spec §8.1): BSQ 350 ep (x0.1 at 250), finetune 300 ep from lr 0.01 (x0.1 at 150/250).
SEARCH_RECIPE = {"epochs": 350, "lr": 0.1, "milestones": [250]}
FINETUNE_RECIPE = {"epochs": 300, "lr": 0.01, "milestones": [150, 250]}


def spelling(alpha: Any) -> str:
    """An alpha as the workflow config spells it ("5e-3" stays "5e-3"): its path component and table label."""
    return alpha if isinstance(alpha, str) else f"{float(alpha):g}"


def alpha_points(workflow: Mapping[str, Any]) -> list[Point]:
    """One search per `alphas` value (when bsq is among the workflow's methods)."""
    if "bsq" not in workflow.get("methods", ["bsq"]):
        return []
    return [
        Point("bsq", f"alpha-{spelling(a)}", {"bsq": {"alpha": float(a)}}, {"alpha": spelling(a)})
        for a in workflow.get("alphas", [])
    ]


def _check_workflow(workflow: Mapping[str, Any]) -> None:
    alphas = workflow.get("alphas", [])
    if any(float(a) <= 0 for a in alphas):
        raise BSQError(f"alphas must all be > 0, got {alphas}; alpha = 0 is no BSQ (use uniform QAT)")


METHOD = Method(
    name="bsq",
    summary="BSQ: bit-plane search with a bit-level group-lasso penalty, prune, finetune (Yang et al., ICLR 2021)",
    sections={"bsq": BSQConfig, "finetune": FinetuneConfig},
    stages=(
        StageSpec(
            "search",
            "bsq.methods.bsq.search:run",
            ("checkpoint", "metrics", "history", "run"),
            SEARCH_RECIPE,
            reads=("quant", "bsq"),
            help="BSQ search for one alpha: bit planes + group Lasso + periodic re-quantization",
            flags=(Flag("--alpha", "bsq.alpha, the regularisation strength (e.g. 5e-3)", key="bsq.alpha", type=float),),
        ),
        StageSpec(
            "prune",
            "bsq.methods.bsq.prune:run",
            ("checkpoint", "scheme", "layers", "metrics", "run"),
            {"epochs": 0},
            0,
            reads=("quant.maxbit", "bsq.overflow"),  # not the search's alpha: prune never reads it
            help="final re-quantization: scheme.json and the pruned bit model",
        ),
        StageSpec(
            "finetune",
            "bsq.methods.bsq.finetune:run",
            ("checkpoint", "float_checkpoint", "metrics", "history", "run"),
            FINETUNE_RECIPE,
            optional_inputs=("scheme",),
            reads=("quant", "finetune"),
            help="train with the scheme fixed; best model in bit and float form",
            flags=(
                Flag(
                    "--scheme", "scheme.json: finetune a float checkpoint at these precisions (scratch)", input="scheme"
                ),
                Flag(
                    "--allow-unpruned",
                    "accept a search checkpoint (skipping prune: its planes are not re-quantized first)",
                    arg="allow_unpruned",
                    type=bool,
                ),
            ),
        ),
    ),
    evaluated=("finetune", "scratch"),
    points=alpha_points,
    check_workflow=_check_workflow,
    workflow_keys={"bsq.alpha": "the search's alpha comes from `alphas` (one search per value)"},
)

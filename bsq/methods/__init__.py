"""The method registry: every quantization method the suite runs, looked up by name.

A method is one package under `bsq/methods/<name>/` whose `__init__` declares a `Method` (torch-free: config
sections, stages, the points the workflow runs it at) and whose other modules run its stages. Adding one means a
new package, one line in `_METHODS` below, its schema section and its tests (README, "Adding a method").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from bsq.errors import BSQError
from bsq.methods.base import Flag, Method, Point, StageSpec, format_number

__all__ = [
    "Flag",
    "Method",
    "Point",
    "StageSpec",
    "format_number",
    "method_names",
    "get_method",
    "registry",
    "stage_spec",
    "all_stages",
    "GENERIC_STAGES",
    "method_of_stage",
    "config_sections",
    "points",
    "settings_for",
    "form_builder",
]

# name -> the package declaring it (imported on first use; each is torch-free). The order is the tables' order.
_METHODS = {
    "bsq": "bsq.methods.bsq",
    "csq": "bsq.methods.csq",  # BSQ's successors: bit-level, then LSB-level sparsity
    "msq": "bsq.methods.msq",
    "fracbits": "bsq.methods.fracbits",  # the classic searches: differentiable bits, Hessian + ILP, super-network
    "hawq": "bsq.methods.hawq",
    "dnas": "bsq.methods.dnas",
    "uniform": "bsq.methods.uniform",
}


# The stages every method shares: the float model, and the measurement of any checkpoint. Pretrain may train 0
# epochs only when it imports a checkpoint (the stage checks that); evaluate trains nothing.
GENERIC_STAGES = {
    "pretrain": StageSpec(
        "pretrain",
        "bsq.stages.pretrain:run",
        ("checkpoint", "metrics", "history", "run"),
        {"epochs": 350, "lr": 0.1, "milestones": [150, 250, 325]},  # spec §8.1: FP 350 ep, x0.1 at 150/250/325
        inputs=(),
        optional_inputs=("import_checkpoint",),
        reads=(),
        help="train (or import) the full-precision model",
        flags=(
            Flag(
                "--import-checkpoint",
                "start from this float checkpoint (ours or the authors')",
                input="import_checkpoint",
            ),
        ),
    ),
    "evaluate": StageSpec(
        "evaluate",
        "bsq.stages.evaluate:run",
        ("metrics", "layers", "run"),
        {"epochs": 0},
        0,
        reads=(),
        help="top-1/top-5, bits, compression, size, BitOPs of any checkpoint",
        flags=(
            Flag("--weight-bits", "quantize an official float checkpoint to N bits first", arg="weight_bits", type=int),
        ),
    ),
}


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


@cache
def registry() -> dict[str, Method]:
    methods = {name: importlib.import_module(module).METHOD for name, module in _METHODS.items()}
    _check_unique(methods)
    return methods


def _check_unique(methods: Mapping[str, Method]) -> None:
    """Stage names are CLI commands and job kinds, so they must be unique; a section two methods share (qat) must
    be the same dataclass."""
    owner: dict[str, str] = {}
    sections: dict[str, type] = {}
    for name, method in methods.items():
        if method.name != name:
            raise RuntimeError(f"bsq.methods registers {name!r} but its METHOD is named {method.name!r}")
        for spec in method.stages:
            if spec.name in owner:
                raise RuntimeError(f"stage {spec.name!r} is declared by both {owner[spec.name]} and {name}")
            owner[spec.name] = name
        for key, cls in method.sections.items():
            if sections.setdefault(key, cls) is not cls:
                raise RuntimeError(f"config section {key!r} is declared with two different dataclasses")


def get_method(name: str) -> Method:
    try:
        return registry()[name]
    except KeyError:
        raise BSQError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None


def method_of_stage(stage: str) -> Method | None:
    """The method that owns a stage job (None for the generic pretrain and evaluate stages)."""
    return next((m for m in registry().values() if any(s.name == stage for s in m.stages)), None)


def stage_spec(stage: str) -> StageSpec | None:
    """The spec of a generic or a method's stage; None for an unknown name."""
    return all_stages().get(stage)


def all_stages() -> dict[str, StageSpec]:
    """Every stage job, generic ones first, then each method's in DAG order (the CLI's commands)."""
    stages = dict(GENERIC_STAGES)
    for method in registry().values():
        stages.update({spec.name: spec for spec in method.stages})
    return stages


def config_sections() -> dict[str, type]:
    """Every method's config sections (section name -> dataclass), for the stage config."""
    out: dict[str, type] = {}
    for method in registry().values():
        out.update(method.sections)
    return out


def points(method: str, workflow: Mapping[str, Any]) -> list[Point]:
    """The points the workflow config runs `method` at."""
    return get_method(method).points(workflow)


def settings_for(method: str, slug: str, workflow: Mapping[str, Any]) -> Point:
    """The point `slug` (a path component such as `alpha-3`) of `method` under this workflow config."""
    for point in points(method, workflow):
        if point.slug == slug:
            return point
    known = [p.slug for p in points(method, workflow)]
    raise BSQError(f"{method} has no point {slug!r} in this config; its points are {known}")


def form_builder(form: str) -> Callable[..., Any] | None:
    """The builder of a method's own checkpoint form (`Method.forms`), imported on use; None when no method has it."""
    for method in registry().values():
        if form in method.forms:
            module, _, function = method.forms[form].partition(":")
            return getattr(importlib.import_module(module), function)
    return None

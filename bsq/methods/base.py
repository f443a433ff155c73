"""What a quantization method declares, in one place, for the library, the CLI and the workflow.

Torch-free on purpose: the Snakefile reads the registry at parse time (which points to run, what each point's stage
config is, which stages each run has), and parsing must not pay for `import torch`. A method's training code lives
in the modules its `StageSpec.runner` names and is imported only when a job runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Flag", "Method", "Point", "StageSpec", "format_number", "budgeted_points"]


def format_number(value: float) -> str:
    """The shortest spelling of a setting for labels and paths: 1.0 -> "1", 0.005 -> "0.005", 5e-05 -> "5e-05"."""
    return f"{float(value):g}"


@dataclass(frozen=True)
class Point:
    """One setting a method runs at (BSQ at one alpha, FracBits at one target, uniform QAT at one bit-width).

    `slug` is its path component and wildcard value (`alpha-3`, `target-0.08`, `bits-4`); `settings` is the stage
    config overlay that puts a job at this point; `labels` go to the run's MLflow tags and table rows; `budget_of`
    is the BSQ point whose measured cost this point matches (FracBits at equal cost), else None."""

    method: str
    slug: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    budget_of: Point | None = None


@dataclass(frozen=True)
class Flag:
    """A stage's own command-line flag: it sets a config `key`, names an `input` file, or passes a keyword `arg`
    to the stage's run function (`type` bool = a switch)."""

    name: str
    help: str
    key: str | None = None
    input: str | None = None
    arg: str | None = None
    type: type = str


@dataclass(frozen=True)
class StageSpec:
    """One stage job a method runs: its optimiser recipe (paper defaults), fewest epochs, declared outputs, and
    the `module:function` that runs it (imported when the job starts)."""

    name: str
    runner: str
    outputs: tuple[str, ...]
    recipe: Mapping[str, Any] = field(default_factory=dict)
    min_epochs: int = 1
    inputs: tuple[str, ...] = ("checkpoint",)  # required input names
    optional_inputs: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None  # extra checks of a resolved StageConfig when it is read
    # Config sections or dotted keys the stage reads beyond the shared ones (its MLflow params); None = all of its
    # method's sections.
    reads: tuple[str, ...] | None = None
    help: str = ""  # one line for `bsq --help`
    flags: tuple[Flag, ...] = ()

    def run_function(self) -> Callable[..., dict]:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class Method:
    """A method as the suite sees it.

    - `sections`: its stage-config sections and their dataclasses (`stages.<stage>.<section>` in the workflow);
    - `stages`: the jobs of one run, in DAG order; `evaluated`: the job folder(s) whose model.pt the evaluate
      stage measures (one table row each);
    - `points(workflow_config)`: the settings the workflow runs it at;
    - `check_workflow(workflow_config)`: the method's cross-key checks of the workflow config (raise BSQError);
    - `workflow_keys`: dotted stage-config keys the workflow sets per point, with where their value comes from
      (a config that sets one under `stages:` is refused);
    - `forms`: the checkpoint forms of its training models (form name -> `module:function` of
      `build(float_model, policy, precisions) -> model`), so a resume file of a half-trained model rebuilds; the
      method's layers carry that name as `checkpoint_form` (bsq.checkpoint). Final checkpoints use the shared forms."""

    name: str
    summary: str
    sections: Mapping[str, type]
    stages: tuple[StageSpec, ...]
    evaluated: tuple[str, ...]
    points: Callable[[Mapping[str, Any]], list[Point]]
    check_workflow: Callable[[Mapping[str, Any]], None] = lambda workflow: None
    workflow_keys: Mapping[str, str] = field(default_factory=dict)
    forms: Mapping[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """The display name tables and plots use: the summary up to its colon ("FracBits", "MSQ (reconstruction)")."""
        return self.summary.partition(":")[0].strip()

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(f"method {self.name} has no stage {name!r}; it has {[s.name for s in self.stages]}")


def budgeted_points(
    method: str,
    workflow: Mapping[str, Any],
    matched: Mapping[str, Any] | None,
    target: Callable[[float], Mapping[str, Any]],
    labels: Mapping[str, str] | None = None,
    label_targets: bool = False,
) -> list[Point]:
    """The points of a method compared with BSQ at equal cost: one per BSQ alpha at the cost that run reached
    (`matched`: the stage-config overlay, None = no matched runs; `budget_of` = that BSQ point), then one per
    explicit target of the method's top-level `targets` (`target(t)`: its overlay). `labels` go on every point;
    `label_targets` also labels an explicit point with its target."""
    from bsq.methods import get_method  # BSQ's points, through the registry (imported late: it imports this module)

    extra = dict(labels or {})
    points = []
    if matched:
        for bsq_point in get_method("bsq").points(workflow):
            points.append(Point(method, bsq_point.slug, matched, {**bsq_point.labels, **extra}, bsq_point))
    for t in (workflow.get(method) or {}).get("targets", []):
        own = {"target": str(t)} if label_targets else {}
        points.append(Point(method, f"target-{t}", target(float(t)), {**own, **extra}))
    return points

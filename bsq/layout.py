"""File names of every stage's outputs: the one place the library, the CLI and the workflow agree on them.

Torch-free on purpose: the Snakefile imports it to declare outputs without paying for `import torch`.
"""

from __future__ import annotations

from pathlib import Path

from bsq.methods import all_stages

FILE_NAMES = {
    "checkpoint": "model.pt",
    "float_checkpoint": "model_float.pt",
    "metrics": "metrics.json",
    "history": "history.csv",
    "scheme": "scheme.json",
    "layers": "layers.csv",
    "run": "run.json",
    "hessian": "hessian.json",  # per-layer Hessian traces and what they decided (HAWQ-V3, MSQ)
}


# stage -> its output names, from the stage specs (the generic stages and each registered method's)
OUTPUTS: dict[str, tuple[str, ...]] = {name: spec.outputs for name, spec in all_stages().items()}


def default_outputs(stage: str, out_dir: str | Path) -> dict[str, Path]:
    """`{output name: out_dir/standard file name}` for one stage."""
    return {name: Path(out_dir) / FILE_NAMES[name] for name in OUTPUTS[stage]}

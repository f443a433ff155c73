"""HAWQ-V3-style allocation (bsq.methods.hawq): the ILP on hand-solved toys, the infeasible-budget message, the
sensitivity on hand-computed tensors, bad inputs, the workflow points, and the stage on tiny digits data.
(The Hutchinson estimator's accuracy is tested in tests/test_hessian.py.)"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from helpers import untracked_config

from bsq.errors import BSQError
from bsq.layout import default_outputs
from bsq.methods import get_method, stage_spec
from bsq.methods.hawq.config import HAWQConfig
from bsq.methods.hawq.ilp import Budget, CostTable, allocate
from bsq.methods.hawq.sensitivity import quantization_error, sensitivity
from bsq.methods.hawq.train import per_param
from bsq.quant.hessian import HessianTrace

# ---- the ILP --------------------------------------------------------------------------------------------------
# Three layers a, b, c, candidates {4, 8}. Omega (4 -> 8 gain): a 10 -> 1 (9), b 5 -> 1 (4), c 20 -> 2 (18).
OMEGA = {"a": {4: 10.0, 8: 1.0}, "b": {4: 5.0, 8: 1.0}, "c": {4: 20.0, 8: 2.0}}
# Equal sizes: 4 MB at 4 bits, 8 MB at 8 bits per layer, nothing fixed.
EQUAL = CostTable("size", 0.0, {n: {4: 4.0, 8: 8.0} for n in "abc"})


def test_ilp_one_8bit_layer_goes_to_the_largest_gain():
    # Budget 16 MB. By hand, (a, b, c): cost, objective
    #   444: 12, 35 | 844: 16, 26 | 484: 16, 31 | 448: 16, 17 | 884 / 848 / 488: 20 > 16 | 888: 24 > 16
    # -> 448 (c, the largest gain 18, gets 8 bits), objective 17, size 16.
    result = allocate(OMEGA, {"size": EQUAL}, [Budget("size", 16.0, "hawq.target")])
    assert result.bits == {"a": 4, "b": 4, "c": 8}
    assert result.objective == pytest.approx(17.0)
    assert result.costs == {"size": pytest.approx(16.0)}
    assert result.status == "optimal"


def test_ilp_weighs_the_cost_of_each_layer():
    # c costs twice as much (8 MB at 4 bits, 16 at 8) plus 1 MB fixed. Budget 21 MB, by hand:
    #   444: 17, 35 | 844: 21, 26 | 484: 21, 31 | 448: 25 > 21 | 884: 25 > 21 | any other: >= 29
    # -> 844 (a, the best gain per MB that fits), objective 26.
    table = CostTable("size", 1.0, {"a": {4: 4.0, 8: 8.0}, "b": {4: 4.0, 8: 8.0}, "c": {4: 8.0, 8: 16.0}})
    result = allocate(OMEGA, {"size": table}, [Budget("size", 21.0, "hawq.target")])
    assert result.bits == {"a": 8, "b": 4, "c": 4}
    assert result.objective == pytest.approx(26.0)


def test_ilp_tied_layers_share_bits():
    # Equal sizes, budget 20 MB. Untied, by hand: 848 (cost 20, objective 8) is best.
    # Tied b == c: 444 (12, 35), 844 (16, 26), 488 (20, 13); 848 / 448 / 484 break the tie, 888 costs 24
    # -> 488, objective 13.
    budget = [Budget("size", 20.0, "hawq.target")]
    assert allocate(OMEGA, {"size": EQUAL}, budget).bits == {"a": 8, "b": 4, "c": 8}
    tied = allocate(OMEGA, {"size": EQUAL}, budget, ties=[("b", "c")])
    assert tied.bits == {"a": 4, "b": 8, "c": 8}
    assert tied.objective == pytest.approx(13.0)


def test_ilp_two_budgets_bind_together():
    # Size 20 allows 848 (objective 8); a BitOPs table where c is expensive (c at 8 bits: 10 G, others 1 G at 8,
    # 0.5 at 4), limit 6 G: 848 costs 1 + 0.5 + 10 > 6, so the best with c at 4 is 884 (size 20, objective 22).
    bitops = CostTable("bitops", 0.0, {"a": {4: 0.5, 8: 1.0}, "b": {4: 0.5, 8: 1.0}, "c": {4: 2.0, 8: 10.0}})
    budgets = [Budget("size", 20.0, "hawq.target"), Budget("bitops", 6.0, "hawq.bitops_limit")]
    result = allocate(OMEGA, {"size": EQUAL, "bitops": bitops}, budgets)
    assert result.bits == {"a": 8, "b": 8, "c": 4}
    assert result.costs == {"size": pytest.approx(20.0), "bitops": pytest.approx(4.0)}


def test_ilp_infeasible_budget_names_the_smallest_reachable_cost():
    # Every layer at 4 bits costs 3 x 4 = 12 MB: a budget of 11 cannot be met.
    with pytest.raises(BSQError, match=r"smallest reachable cost is 12 MB.*raise hawq\.target to at least 12"):
        allocate(OMEGA, {"size": EQUAL}, [Budget("size", 11.0, "hawq.target")])


def test_ilp_scales_tiny_numbers():
    # MB-sized costs and 1e-9 sensitivities (a small CIFAR model): the same answer as the first toy.
    omega = {n: {b: v * 1e-9 for b, v in row.items()} for n, row in OMEGA.items()}
    table = CostTable("size", 1e-3, {n: {4: 4e-5, 8: 8e-5} for n in "abc"})
    result = allocate(omega, {"size": table}, [Budget("size", 1e-3 + 16e-5, "hawq.target")])
    assert result.bits == {"a": 4, "b": 4, "c": 8}


# ---- the sensitivity -----------------------------------------------------------------------------------------
def test_dorefa_error_by_hand():
    # w = (0.5, -0.5, 0): m = max|tanh w| = tanh(0.5); u = (tanh(w) / m + 1) / 2 = (1, 0, 0.5).
    # 2 bits (3 steps): round(1.5) = 2 -> q = 2/3 -> 2q - 1 = 1/3 -> error m/3 at w = 0, none at +-0.5.
    # 1 bit (1 step): round(0.5) = 0 (half to even) -> -1 -> error -m at w = 0.
    m = math.tanh(0.5)
    w = torch.tensor([[0.5, -0.5, 0.0]])
    assert quantization_error(w, 2, "dorefa") == pytest.approx(m**2 / 9, rel=1e-12)
    assert quantization_error(w, 1, "dorefa") == pytest.approx(m**2, rel=1e-12)
    assert sensitivity(2.0, w, 2, "dorefa") == pytest.approx(2.0 * m**2 / 9, rel=1e-12)


def test_hawq_symmetric_per_channel_error_by_hand():
    # Row 1 (0.5, -0.25, 0.1, 0), row 2 (0.2, -0.1, 0.05, 0); n = 2^(b-1) - 1, s_c = max|W_c| / n.
    # 2 bits: n = 1. Row 1: s 0.5, W/s (1, -0.5, 0.2, 0) -> (1, 0, 0, 0): errors (0, 0.25, -0.1, 0) -> 0.0725.
    #         Row 2: s 0.2, W/s (1, -0.5, 0.25, 0) -> (1, 0, 0, 0): errors (0, 0.1, -0.05, 0) -> 0.0125. Sum 0.085.
    # 3 bits: n = 3. Row 1: s 1/6, W/s (3, -1.5, 0.6, 0) -> (3, -2, 1, 0): errors (0, -1/12, 1/15, 0)
    #         -> 1/144 + 1/225. Row 2: s 0.2/3, W/s (3, -1.5, 0.75, 0) -> (3, -2, 1, 0): errors
    #         (0, -1/30, 1/60, 0) -> 1/900 + 1/3600.
    w = torch.tensor([[0.5, -0.25, 0.1, 0.0], [0.2, -0.1, 0.05, 0.0]], dtype=torch.float64)
    assert quantization_error(w, 2, "hawq") == pytest.approx(0.085, rel=1e-9)
    expected3 = 1 / 144 + 1 / 225 + 1 / 900 + 1 / 3600
    assert quantization_error(w, 3, "hawq") == pytest.approx(expected3, rel=1e-9)
    assert sensitivity(0.5, w, 3, "hawq") == pytest.approx(0.5 * expected3, rel=1e-9)


def test_more_bits_never_worse_on_a_random_tensor():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    for quantizer in ("dorefa", "hawq"):
        errors = [quantization_error(w, b, quantizer) for b in (2, 4, 8)]
        assert errors[0] > errors[1] > errors[2] > 0, quantizer


def test_negative_traces_are_raised_to_the_least_positive_one():
    # per_param = trace / numel: a 2 / 4 = 0.5, b -3 / 3 = -1, c 1 / 10 = 0.1 -> floor: b takes 0.1, the smallest
    # positive Tr / n; keep: b stays -1.
    traces = {
        "a": HessianTrace(2.0, 0.1, 4, 8, True),
        "b": HessianTrace(-3.0, 0.1, 3, 8, True),
        "c": HessianTrace(1.0, 0.1, 10, 8, True),
    }
    assert per_param(traces, "floor") == pytest.approx({"a": 0.5, "b": 0.1, "c": 0.1})
    assert per_param(traces, "keep") == pytest.approx({"a": 0.5, "b": -1.0, "c": 0.1})


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"candidates": []}, r"hawq\.candidates must be a non-empty list"),
        ({"candidates": [0, 4]}, r"hawq\.candidates must be bit-widths in 1\.\.16"),
        ({"candidates": [4, 17]}, r"hawq\.candidates must be bit-widths in 1\.\.16"),
        ({"candidates": [4, 8, 4]}, r"hawq\.candidates must be distinct"),
        ({"candidates": [4.5, 8]}, r"hawq\.candidates must be a non-empty list"),
        ({"samples": 0}, r"hawq\.samples must be an integer >= 1"),
        ({"hessian_batches": 0}, r"hawq\.hessian_batches must be an integer >= 1"),
        ({"rel_tol": 0}, r"hawq\.rel_tol must be a number > 0"),
        ({"target": -1.0}, r"hawq\.target must be null or a number > 0"),
        ({"cost": "latency"}, r"hawq\.cost must be size or bitops"),
        ({"quantizer": "hawq", "candidates": [1, 4]}, r"hawq\.candidates must be bit-widths >= 2"),
        ({"cost": "size", "size_limit": 1.0}, r"hawq\.size_limit must be null when hawq\.cost is size"),
        ({"negative_traces": "abs"}, r"hawq\.negative_traces must be floor or keep"),
        ({"activations": "float"}, r"hawq\.activations must be fixed or same"),
    ],
)
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(BSQError, match=message):
        HAWQConfig(**settings)


def test_candidates_are_sorted():
    assert HAWQConfig(candidates=[8, 2, 4]).candidates == [2, 4, 8]


def _workflow(**hawq):
    return {"methods": ["bsq", "hawq"], "alphas": ["5e-3", "1e-2"], "hawq": hawq}


def test_points_match_bsq_and_explicit_targets():
    points = get_method("hawq").points(_workflow(match="bitops", targets=["0.5"], cost="size"))
    assert [p.slug for p in points] == ["alpha-5e-3", "alpha-1e-2", "target-0.5"]
    assert points[0].settings == {"hawq": {"match": "bitops", "cost": "bitops"}}
    assert points[0].budget_of is not None
    assert points[2].settings == {"hawq": {"target": 0.5, "cost": "size"}}


@pytest.mark.parametrize(
    ("workflow", "message"),
    [
        (_workflow(match=None), r"nothing sets its targets"),
        (
            {**_workflow(match="compression"), "stages": {"hawq": {"hawq": {"candidates": []}}}},
            r"stages\.hawq\.hawq\.candidates must be a non-empty list",
        ),
        (
            {**_workflow(match="compression"), "stages": {"common": {"hawq": {"samples": 0}}}},
            r"stages\.common\.hawq\.samples must be an integer >= 1",
        ),
        (_workflow(match="latency"), r"hawq\.match must be one of"),
    ],
)
def test_workflow_checks(workflow, message):
    with pytest.raises(BSQError, match=message):
        get_method("hawq").check_workflow(workflow)


# ---- the stage on tiny digits data ---------------------------------------------------------------------------
FAST = {"samples": 4, "min_samples": 2, "hessian_batches": 1}
SMALL = {"train_subset": 128, "test_subset": 200}  # a fraction of the helper's digits: these tests check plumbing


def _config(tmp_path, epochs):
    cfg = untracked_config(tmp_path, epochs=epochs)
    return {**cfg, "data": {**cfg["data"], **SMALL}}


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("hawq")
    cfg = _config(root, epochs=1)
    out = default_outputs("pretrain", root / "pretrain")
    stage_spec("pretrain").run_function()({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out)
    return out["checkpoint"]


def _run(tmp_path, checkpoint, hawq, inputs=None):
    cfg = {**_config(tmp_path, epochs=1), "hawq": {**FAST, **hawq}}
    out = default_outputs("hawq", tmp_path / "hawq")
    stage_spec("hawq").run_function()(cfg, {"checkpoint": checkpoint, **(inputs or {})}, out)
    return out


def test_stage_allocates_trains_and_evaluates(float_checkpoint, tmp_path):
    out = _run(tmp_path, float_checkpoint, {"target": 0.004})
    metrics = json.loads(out["metrics"].read_text())
    assert metrics["ilp_status"] == "optimal" and metrics["target"] == 0.004
    assert metrics["predicted_cost"] <= 0.004 and metrics["budget_met"]
    assert metrics["achieved_cost"] == pytest.approx(metrics["predicted_cost"], rel=1e-6)  # evaluate's numbers
    hessian = json.loads((out["metrics"].parent / "hessian.json").read_text())
    layers = hessian["layers"]
    assert set(layers) == {k.removeprefix("trace/") for k in metrics if k.startswith("trace/")}
    scheme = json.loads(out["scheme"].read_text())
    assert {scheme[name] for name in layers} <= {4, 8} and scheme["conv1"] == 8 and scheme["fc"] == 8
    assert {scheme[name] for name in layers} == {4, 8}  # 0.004 MB lies between all-4 and all-8 on this model
    assert all(scheme[f"{name}.act"] == 4 for name in layers)  # hawq.activations: fixed, at model.act_bits
    for name, row in layers.items():
        assert row["bits"] == scheme[name] and row["samples"] <= FAST["samples"]
        assert row["per_param"] == pytest.approx(row["trace"] / row["numel"])
    ties = hessian["ilp"]["ties"]
    assert ties and all(scheme[a] == scheme[b] for a, b in ties)
    evaluated = default_outputs("evaluate", tmp_path / "evaluate")
    cfg = _config(tmp_path, epochs=0)
    stage_spec("evaluate").run_function()(cfg, {"checkpoint": out["checkpoint"]}, evaluated)
    assert json.loads(evaluated["metrics"].read_text())["size_mb"] == pytest.approx(metrics["achieved_cost"])


def test_stage_bitops_budget_with_a_size_limit(float_checkpoint, tmp_path):
    # activations "same": a searched layer's input at its weight bits (W4A4 / W8A8 per layer, as HAWQ-V3's zoo)
    hawq = {"cost": "bitops", "target": 0.0015, "size_limit": 0.0045, "activations": "same"}
    out = _run(tmp_path, float_checkpoint, hawq)
    metrics = json.loads(out["metrics"].read_text())
    assert metrics["predicted_bitops"] <= 0.0015 and metrics["predicted_size"] <= 0.0045 and metrics["budget_met"]
    assert metrics["achieved_bitops"] == pytest.approx(metrics["predicted_bitops"], rel=1e-6)
    assert metrics["bitops_g"] == metrics["achieved_cost"] and metrics["size_mb"] == metrics["achieved_size"]
    scheme = json.loads(out["scheme"].read_text())
    layers = json.loads((out["metrics"].parent / "hessian.json").read_text())["layers"]
    assert all(scheme[f"{name}.act"] == scheme[name] for name in layers)
    assert {scheme[name] for name in layers} == {4, 8} and scheme["fc.act"] == 8


def test_stage_matches_a_bsq_budget(float_checkpoint, tmp_path):
    budget = tmp_path / "bsq_metrics.json"
    budget.write_text(json.dumps({"compression": 6.0, "labels": {"method": "bsq", "alpha": "0.005"}}))
    out = _run(tmp_path, float_checkpoint, {"match": "compression"}, {"budget": budget})
    metrics = json.loads(out["metrics"].read_text())
    # the same average bits over the counted weights: 32 / 6 bits per counted entry
    assert metrics["target"] == pytest.approx(32 / 6 * metrics["quantized_params"] / 8e6)
    assert metrics["compression"] >= 6.0 and metrics["labels"]["alpha"] == "0.005"
    assert metrics["budget_reachable"] is True and "target_used" not in metrics and "budget_floor" not in metrics


def test_stage_matched_budget_below_the_floor_runs_at_the_floor(float_checkpoint, tmp_path, caplog):
    # compression 1000: 0.032 bits per counted weight, far under every searched layer at 4 bits (BSQ's 0.87 average
    # bits under a 1-bit floor, in small): the run goes on at the floor and flags the miss instead of failing
    budget = tmp_path / "bsq_metrics.json"
    budget.write_text(json.dumps({"compression": 1000.0, "labels": {"method": "bsq", "alpha": "0.02"}}))
    with caplog.at_level(logging.WARNING, logger="bsq"):
        out = _run(tmp_path, float_checkpoint, {"match": "compression"}, {"budget": budget})
    metrics = json.loads(out["metrics"].read_text())
    assert metrics["target"] == pytest.approx(32 / 1000 * metrics["quantized_params"] / 8e6)  # the requested one
    assert metrics["budget_reachable"] is False and "budget_ceiling" not in metrics
    assert metrics["target_used"] == metrics["budget_floor"] > metrics["target"]
    assert metrics["predicted_cost"] == pytest.approx(metrics["budget_floor"], rel=1e-9)
    assert metrics["achieved_cost"] == pytest.approx(metrics["budget_floor"], rel=1e-6)
    assert metrics["budget_met"] is False and metrics["cost_rel_error"] > 0  # vs the requested target
    layers = json.loads((out["metrics"].parent / "hessian.json").read_text())["layers"]
    assert {row["bits"] for row in layers.values()} == {4}  # every searched layer at its cheapest candidate
    assert metrics["labels"]["alpha"] == "0.02"
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{metrics['target']:.6g} MB is below the smallest reachable cost" in warning
    assert f"running at {metrics['budget_floor']:.6g} MB" in warning


def test_stage_infeasible_target_fails_before_training(float_checkpoint, tmp_path):
    # an explicit target is the user's number: below the floor it stays an error (a matched budget runs, above)
    with pytest.raises(BSQError, match=r"smallest reachable cost is [0-9.]+ MB.*raise hawq\.target"):
        _run(tmp_path, float_checkpoint, {"target": 0.001})
    assert not (tmp_path / "hawq" / "metrics.json").exists()

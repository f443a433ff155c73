"""MSQ (a labelled reconstruction, methods-next.md MSQ): the LSB residual and its gradient by hand, the pruning rule
by sensitivity by hand, the exact export to BSQ's bit form, bad input, and a digits run through the stage."""

from __future__ import annotations

import json

import pytest
import torch

from bsq.checkpoint import Form, load_model, make_checkpoint, model_form
from bsq.errors import BSQError
from bsq.methods import get_method, stage_spec
from bsq.methods.msq.config import MSQConfig
from bsq.methods.msq.layers import MSQPolicy, export_, msq_layers, msq_quantize_model, training_footprint
from bsq.methods.msq.prune import Budget, force_budget, lsb_drops, prune_step
from bsq.metrics import summary
from bsq.models import create_model
from bsq.quant import lsb
from bsq.stages import default_outputs
from tests.helpers import untracked_config

TOY = [0.9, -0.55, 0.3, 0.1, -1.0]  # s = max|w| = 1


# ---- the quantizer and the LSB residual, by hand --------------------------------------------------------------
def test_lsb_residual_and_gradient_nested_by_hand():
    # n = 2, G = 4: 4 w~ = [3.6, 2.2, 1.2, 0.4, 4.0] -> q = [3, 2, 1, 0, 3] (4 clamped to 3);
    # 2 w~ = [1.8, 1.1, 0.6, 0.2, 2.0] -> h = [2, 1, 1, 0, 2] clamped to 1 -> [1, 1, 1, 0, 1]; r = q - 2h
    w = torch.tensor(TOY, requires_grad=True)
    r = lsb.lsb_residual(w, 2, "nested")
    assert r.tolist() == [1, 0, -1, 0, 1]
    r.abs().sum().backward()
    # d|r|/dw = sign(r) G sign(w) / s: 0.3 (r = -1) is pulled up to the 1-bit point 0.5, 0.9 down to 0.5,
    # -1.0 towards -0.5 (the coarser grid's top); r = 0 entries get nothing
    assert w.grad.tolist() == [4.0, 0.0, -4.0, 0.0, -4.0]


def test_lsb_residual_bsq_levels_by_hand():
    # n = 2, G = 3: 3 w~ = [2.7, 1.65, 0.9, 0.3, 3.0] -> q = [3, 2, 1, 0, 3];
    # 1.5 w~ = [1.35, 0.825, 0.45, 0.15, 1.5] -> round [1, 1, 0, 0, 2] -> clamp 1 -> h = [1, 1, 0, 0, 1]
    w = torch.tensor(TOY, requires_grad=True)
    r = lsb.lsb_residual(w, 2, "bsq")
    assert r.tolist() == [1, 0, 1, 0, 1]
    r.abs().sum().backward()
    assert w.grad.tolist() == [3.0, 0.0, 3.0, 0.0, -3.0]


def test_forward_weight_and_ste_by_hand():
    w = torch.tensor(TOY, requires_grad=True)
    q = lsb.quantize_weight(w, 2, "nested")  # sign(w) s q / 4
    assert torch.allclose(q, torch.tensor([0.75, -0.5, 0.25, 0.0, -0.75]))
    q.sum().backward()
    assert w.grad.tolist() == [1.0] * 5  # identity STE, through the clamp too (BSQ's, spec P7)
    assert lsb.quantize_weight(w.detach(), 3, "bsq").tolist() == pytest.approx([6 / 7, -4 / 7, 2 / 7, 1 / 7, -1.0])


def test_residual_is_a_signed_bit_and_zero_exactly_on_the_coarser_grid():
    torch.manual_seed(0)
    w = torch.randn(2000)
    for kind in ("nested", "bsq"):
        for n in range(1, 9):
            r = lsb.lsb_residual(w, n, kind)
            assert set(r.unique().tolist()) <= {-1.0, 0.0, 1.0}, (kind, n)
    # nested: a weight on the (n-1)-bit grid has r = 0 and the same n-bit and (n-1)-bit forward
    s = w.abs().max()
    coarse = torch.sign(w) * s * lsb.codes(w, s, 3, "nested") / 8
    assert bool((lsb.lsb_residual(coarse, 4, "nested", s) == 0).all())
    assert torch.allclose(lsb.quantize_weight(coarse, 4, "nested", s), lsb.quantize_weight(coarse, 3, "nested", s))


def test_penalty_normalisations_by_hand():
    from torch import nn

    from bsq.methods.msq.layers import MSQLinear
    from bsq.methods.msq.train import penalty

    first = MSQLinear(5, 1, bias=False, nbits=2)
    last = MSQLinear(3, 1, bias=False, nbits=1)  # at min_bits: no LSB left to drop, out of the sum
    with torch.no_grad():
        first.weight.copy_(torch.tensor([TOY]))
        last.weight.copy_(torch.tensor([[0.2, -0.7, 0.4]]))
    model = nn.Sequential(first, last)
    # sum |r| of the first layer = |1| + 0 + |-1| + 0 + |1| = 3 (the hand test above)
    expected = {"none": 0.5 * 3, "layer": 0.5 * 3 / 5, "model": 0.5 * 3 / 8}
    for normalize, value in expected.items():
        got = penalty(model, MSQConfig(lam=0.5, normalize=normalize, units="code", min_bits=1))
        assert float(got.detach()) == pytest.approx(value), normalize
    # units: value divides the first layer's sum by G_2 = 4 (the LSB's value on the normalised weight)
    got = penalty(model, MSQConfig(lam=0.5, normalize="none", units="value", min_bits=1))
    assert float(got.detach()) == pytest.approx(0.5 * 3 / 4)
    assert penalty(model, MSQConfig(lam=0.0)) is None


# ---- the pruning rule, by hand ----------------------------------------------------------------------------------
def test_pruning_rule_one_or_two_lsbs_by_sensitivity():
    shares = {"a": 0.05, "b": 0.02, "c": 0.08, "d": 0.3, "e": 0.01}
    bits = {"a": 6, "b": 4, "c": 5, "d": 8, "e": 2}
    sens = {"a": 1.0, "b": 5.0, "c": 0.5, "d": 0.1, "e": 3.0}  # mean over all five = 1.92
    # d is not sparse enough (0.3 > 0.1); e is at min_bits 2; a (1.0) and c (0.5) are below the mean: 2 LSBs;
    # b (5.0) above: 1 LSB; order: sparsest first
    drops = lsb_drops(shares, bits, sens, threshold=0.1, multi_lsb=2, min_bits=2)
    assert drops == {"b": 1, "a": 2, "c": 2}
    assert list(drops) == ["b", "a", "c"]
    assert lsb_drops(shares, bits, None, 0.1, 2, 2) == {"b": 1, "a": 1, "c": 1}  # msq.hessian: false
    # never below min_bits: c at 3 bits with min 2 drops 1 even though insensitive
    assert lsb_drops(shares, {**bits, "c": 3}, sens, 0.1, 2, 2)["c"] == 1


def _toy_model(bits: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return msq_quantize_model(create_model("resnet8", num_classes=10, width=4, act_bits=4), MSQPolicy(nbits=bits))


def test_prune_step_stops_at_the_budget_and_force_meets_it():
    model = _toy_model(6)
    cfg = MSQConfig(threshold=0.9, hessian=False, min_bits=1)  # every layer is a candidate
    budget = Budget(model, "compression", 6.0, (3, 32, 32))  # 5.33 bits on average, from 6
    step = prune_step(model, cfg, budget, None)
    assert step.reached and budget.reached(model)
    assert 0 < len(step.drops) < len(list(msq_layers(model)))  # stopped part-way, sparsest layers first
    far = Budget(model, "compression", 30.0, (3, 32, 32))  # ~1 bit: threshold pruning alone cannot reach it
    forced = force_budget(model, MSQConfig(min_bits=1), far)
    assert far.reached(model) and sum(forced.values()) > 0
    too_far = Budget(model, "compression", 64.0, (3, 32, 32))  # below 1 bit: not reachable at min_bits 1
    force_budget(model, MSQConfig(min_bits=1), too_far)
    assert not too_far.reached(model) and all(layer.nbits == 1 for _, layer in msq_layers(model))


# ---- export to BSQ's bit form ----------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", ["nested", "bsq"])
def test_exported_bit_model_computes_exactly_msq_forward(levels):
    torch.manual_seed(1)
    model = msq_quantize_model(create_model("resnet8", num_classes=10, width=4, act_bits=4), MSQPolicy(levels=levels))
    for i, (_, layer) in enumerate(msq_layers(model)):
        layer.set_bits_(1 + i % 8)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    before, cost = model(x), summary(model)
    assert model_form(model) == "msq"
    export_(model)
    assert model_form(model) == Form.BITS and not list(msq_layers(model))
    assert torch.equal(model(x), before)
    assert summary(model)["total_bits"] == cost["total_bits"]
    # and through a bit-form checkpoint, as evaluate reads it
    ckpt = make_checkpoint(model, stage="msq", model_args=_args(), policy={"quantize_shortcuts": False})
    assert ckpt["form"] == "bits"
    assert torch.equal(load_model(ckpt).eval()(x), before)


def _args() -> dict:
    return {"arch": "resnet8", "num_classes": 10, "width": 4, "act_bits": 4}


def test_msq_form_checkpoint_round_trip():
    """A resume file of the training form rebuilds through Method.forms with bits and grid restored."""
    args = _args()
    model = msq_quantize_model(create_model(args.pop("arch"), **args), MSQPolicy(levels="bsq"))
    for i, (_, layer) in enumerate(msq_layers(model)):
        layer.set_bits_(2 + i % 3)
    ckpt = make_checkpoint(model, stage="msq", model_args=_args(), policy={"quantize_shortcuts": False})
    assert ckpt["form"] == "msq" and ckpt["precisions"]["conv1"] == 2 and ckpt["precisions"]["fc.bias"] == 8
    loaded = load_model(ckpt)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert [(n, layer.nbits, layer.levels) for n, layer in msq_layers(loaded)] == [
        (n, layer.nbits, layer.levels) for n, layer in msq_layers(model)
    ]


def test_training_footprint_counts_float_weights_against_bsq_planes():
    model = _toy_model(8)
    foot = training_footprint(model, 8)
    weights = sum(
        layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0) for _, layer in msq_layers(model)
    )
    tensors = sum(1 + (layer.bias is not None) for _, layer in msq_layers(model))
    assert foot["quantized_params"] == weights
    assert foot["bsq_params"] == foot["trainable_params"] + 15 * weights + tensors  # 16 planes instead of 1 weight
    assert foot["optimizer_state_bytes"] == 4 * foot["trainable_params"]


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"threshold": 0.0}, "msq.threshold"),
        ({"threshold": 1.0}, "msq.threshold"),
        ({"init_bits": 1}, "msq.init_bits"),
        ({"init_bits": 17}, "msq.init_bits"),
        ({"min_bits": 5, "init_bits": 4}, "msq.min_bits"),
        ({"lam": -0.1}, "msq.lam"),
        ({"multi_lsb": 0}, "msq.multi_lsb"),
        ({"levels": "odd"}, "msq.levels"),
        ({"units": "bits"}, "msq.units"),
        ({"target": 0.5}, "msq.target"),
    ],
)
def test_bad_input_names_the_key(settings, key):
    with pytest.raises(BSQError, match=key.replace(".", r"\.")):
        MSQConfig(**settings)


def test_points_and_workflow_checks():
    method = get_method("msq")
    workflow = {"alphas": ["5e-3"], "msq": {"match": "compression", "targets": ["20.13"]}}
    slugs = {p.slug: p for p in method.points(workflow)}
    assert slugs["target-20.13"].settings == {"msq": {"target": 20.13, "match": "compression"}}
    assert any(p.budget_of is not None for p in slugs.values())
    assert method.title == "MSQ (reconstruction)"
    with pytest.raises(BSQError, match="msq.targets"):
        method.check_workflow({"alphas": [], "msq": {"match": None}})


# ---- the stage on digits -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("msq")
    cfg = untracked_config(root, epochs=1)
    out = default_outputs("pretrain", root / "pretrain")
    stage_spec("pretrain").run_function()({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out)
    return out["checkpoint"]


def test_stage_prunes_to_a_bsq_budget_and_saves_the_bit_form(float_checkpoint, tmp_path):
    budget = tmp_path / "bsq_metrics.json"
    budget.write_text(json.dumps({"compression": 8.0, "labels": {"method": "bsq", "alpha": "5e-3"}}))
    settings = {"prune_interval": 1, "threshold": 0.6, "hessian_batches": 1, "hessian_samples": 2}
    cfg = {**untracked_config(tmp_path, epochs=2), "msq": settings}
    out = default_outputs("msq", tmp_path / "msq")
    stage_spec("msq").run_function()(cfg, {"checkpoint": float_checkpoint, "budget": budget}, out)
    metrics = json.loads(out["metrics"].read_text())
    assert metrics["reconstruction"] is True and metrics["labels"]["reconstruction"] == "true"
    assert metrics["labels"]["alpha"] == "5e-3" and metrics["match"] == "compression"
    assert metrics["prune_steps"] == 1 and metrics["lsbs_dropped"] + metrics["lsbs_forced"] > 0
    assert metrics["budget_met"] is True and metrics["compression"] >= 8.0 * (1 - 0.01)
    assert metrics["trainable_params"] < metrics["bsq_params"] / 8
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["form"] == "bits"
    scheme = json.loads(out["scheme"].read_text())
    assert scheme == {k: v for k, v in ckpt["precisions"].items()}
    evaluated = default_outputs("evaluate", tmp_path / "evaluate")
    stage_spec("evaluate").run_function()(
        untracked_config(tmp_path, epochs=0), {"checkpoint": out["checkpoint"]}, evaluated
    )
    again = json.loads(evaluated["metrics"].read_text())
    assert again["top1"] == pytest.approx(metrics["top1"]) and again["compression"] == pytest.approx(
        metrics["compression"]
    )

"""DNAS / EdMIPS (bsq.methods.dnas): the mixed layer's efficient form, the expected cost, the search's preference
for the sensitive layer, the bad-input errors, and the stage on tiny digits data (methods-next.md "DNAS and
EdMIPS")."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from bsq.budgets import clamp_matched
from bsq.checkpoint import load_checkpoint
from bsq.errors import BSQError
from bsq.methods import get_method, stage_spec
from bsq.methods.dnas.config import DnasConfig
from bsq.methods.dnas.cost import ExpectedCost, complexity_term
from bsq.methods.dnas.supernet import MixedLayer, build, derive_, mixed_layers, to_supernet_
from bsq.quant.frac import FracPolicy, frac_quantize_model
from bsq.stages import default_outputs
from tests.helpers import interrupt_after_first_epoch, untracked_config


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )  # fmt: skip


def _one_hot_(theta: torch.Tensor, index: int, big: float = 1e4) -> None:
    with torch.no_grad():
        theta.fill_(0.0)
        theta[index] = big


# ---- the efficient form -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("w, a", [(1, 2), (2, 4), (4, 3)])
def test_one_hot_mixture_is_the_single_candidate_layer(w, a):
    """softmax of a huge logit = one-hot: the mixed conv (weights and inputs mixed before one convolution) equals
    FracBits' conv at those integer bits, exactly in value and to rounding in the weight / clip gradients."""
    policy = FracPolicy(w_bits=(1, 4), a_bits=(2, 4))
    supernet = to_supernet_(frac_quantize_model(_convnet(), policy), [1, 2, 4], [2, 3, 4])
    single = frac_quantize_model(_convnet(), FracPolicy(w_bits=(w, w), a_bits=(a, a), hard=True))
    single.load_state_dict({k: v for k, v in supernet.state_dict().items() if k in single.state_dict()}, strict=False)
    layer = supernet[2]
    assert isinstance(layer, MixedLayer) and layer.mixing and layer.w_cands == [1, 2, 4]
    _one_hot_(layer.theta_w, w - 1)
    for mixed in (layer, supernet[5]):  # the last linear's input is searched too (FracBits' policy)
        _one_hot_(mixed.theta_a, a - 2)
    x = torch.randn(4, 3, 6, 6)
    out_mixed, out_single = supernet(x), single(x)
    torch.testing.assert_close(out_mixed, out_single, rtol=0, atol=0)
    out_mixed.square().sum().backward()
    out_single.square().sum().backward()
    # gradients to float rounding: the fixed-bit layer runs PACT as one fused node, the mixture composes it
    torch.testing.assert_close(layer.weight.grad, single[2].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.act_alpha.grad, single[2].act_alpha.grad, rtol=1e-4, atol=1e-5)


def test_mixture_is_the_weighted_sum_of_candidates():
    """pi = (0.2, 0.3, 0.5) over {1, 2, 4}: the mixed weight is 0.2 W_1 + 0.3 W_2 + 0.5 W_4 (DoReFa levels)."""
    layer = to_supernet_(frac_quantize_model(_mlp(), FracPolicy(w_bits=(1, 4), a_bits=None)), [1, 2, 4])[2]
    with torch.no_grad():
        layer.theta_w.copy_(torch.tensor([0.2, 0.3, -1.0, 0.5]).clamp_min(1e-9).log())  # bits 3 masked out
    t = torch.tanh(layer.weight.detach())
    u = (t / t.abs().max() + 1) / 2
    levels = {k: 2 * torch.round(u * (2**k - 1)) / (2**k - 1) - 1 for k in (1, 2, 4)}
    expected = 0.2 * levels[1] + 0.3 * levels[2] + 0.5 * levels[4]
    torch.testing.assert_close(layer.quantized_weight().detach(), expected)


def test_candidates_at_the_fixed_bits_leave_the_fixed_layers_alone():
    """w_bits {2, 4, 8} with the first / last layers fixed at 8: only the middle layer mixes, over {2, 4, 8}."""
    model = to_supernet_(frac_quantize_model(_mlp(), FracPolicy(w_bits=(2, 8), a_bits=None)), [2, 4, 8])
    assert [layer.mixing for _, layer in mixed_layers(model)] == [False, True, False]
    assert model[2].w_cands == [2, 4, 8] and model[0].w_cands == [8] and model[2].theta_w.numel() == 7


def test_gumbel_samples_while_training_and_softmax_in_eval():
    layer = to_supernet_(frac_quantize_model(_mlp(), FracPolicy(w_bits=(1, 4), a_bits=None)), [1, 2, 4])[2]
    layer.gumbel, layer.temperature = True, 5.0
    layer.train()
    torch.manual_seed(0)
    a, b = layer.quantized_weight(), layer.quantized_weight()
    assert not torch.equal(a, b)  # a fresh Gumbel sample per forward
    layer.eval()
    assert torch.equal(layer.quantized_weight(), layer.quantized_weight())


# ---- expected cost ----------------------------------------------------------------------------------------------
def _toy_supernet(a_cands=None):
    policy = FracPolicy(w_bits=(1, 4), a_bits=(2, 4) if a_cands else (4, 4))
    model = to_supernet_(frac_quantize_model(_mlp(), policy), [1, 2, 4], a_cands)
    layer = model[2]
    with torch.no_grad():
        layer.theta_w.copy_(torch.tensor([0.2, 0.3, 1e-30, 0.5]).log())
        if a_cands:
            for mixed in (model[2], model[4]):
                mixed.theta_a.copy_(torch.tensor([0.25, 1e-30, 0.75]).log())
    return model


def test_expected_size_by_hand():
    """Linear 8->16 (fixed 8 bits), 16->16 (E[w] = 0.2*1 + 0.3*2 + 0.5*4 = 2.8), 16->4 (fixed 8 bits); float
    biases at 32 bits: E[size] = (128*8 + 256*2.8 + 64*8 + (16 + 16 + 4)*32) / 8e6 MB."""
    cost = ExpectedCost(_toy_supernet(), (8,), "size")
    by_hand = (128 * 8 + 256 * 2.8 + 64 * 8 + 36 * 32) / 8e6
    assert cost().item() == pytest.approx(by_hand, rel=1e-6)
    assert cost.scheme_cost({"2": (4, 4)}) == pytest.approx((128 * 8 + 256 * 4 + 64 * 8 + 36 * 32) / 8e6, rel=1e-6)


def test_expected_bitops_by_hand():
    """MACs 128, 256, 64 per example; the image input at 8 bits (the fracbits policy), E[a] = 0.25*2 + 0.75*4 = 3.5
    on the searched inputs: E[BitOPs] = 1e-9 (128*8*8 + 256*2.8*3.5 + 64*8*3.5) G."""
    cost = ExpectedCost(_toy_supernet(a_cands=[2, 4]), (8,), "bitops")
    assert cost().item() == pytest.approx(1e-9 * (128 * 64 + 256 * 2.8 * 3.5 + 64 * 8 * 3.5), rel=1e-6)


def test_expected_cost_gradient_and_complexity_forms():
    cost = ExpectedCost(_toy_supernet(), (8,), "size")
    theta = cost.entries[1].module.theta_w
    value = cost()
    assert complexity_term(value, "target", 2.0, value.item() / 2, 1.0).item() == pytest.approx(2.0)
    edmips = complexity_term(value, "edmips", 0.5, None, cost.unit_cost())
    assert cost.unit_cost() == pytest.approx(256 / 8e6)  # the first searched layer at 1 bit
    assert edmips.item() == pytest.approx(0.5 * value.item() / (256 / 8e6))
    value.backward()
    pi = torch.tensor([0.2, 0.3, 0.5])
    bits = torch.tensor([1.0, 2.0, 4.0])
    d_expected = pi * (bits - (pi * bits).sum())  # d E[w] / d theta_c = pi_c (b_c - E[w])
    torch.testing.assert_close(theta.grad[[0, 1, 3]], 256 / 8e6 * d_expected)
    assert theta.grad[2] == 0  # the masked-out 3-bit entry


# ---- the search prefers the sensitive layer -----------------------------------------------------------------------
def test_search_gives_the_sensitive_layer_more_bits():
    """Two searched 32x32 layers of equal size; layer A's output error counts 100x more than layer B's. Under a
    target of 2.5 bits on average (one layer must go low), theta trained on error + lam |E[C]/C_t - 1| gives A the
    higher argmax."""
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    reference = [m.weight.detach().clone() for m in float_model]
    model = to_supernet_(frac_quantize_model(float_model, FracPolicy(w_bits=(1, 4), a_bits=None)), [1, 2, 3, 4])
    sensitive, other = model[1], model[2]
    cost = ExpectedCost(model, (8,), "size")
    target = cost.scheme_cost({"1": (2, None), "2": (3, None)})  # 2.5 bits on average
    optimizer = torch.optim.Adam([sensitive.theta_w, other.theta_w], lr=0.05)
    x = torch.randn(128, 32)

    def error(layer, weight):  # output error against the float layer, scale-free (DoReFa has no scale)
        out, ref = x @ layer.quantized_weight().T, x @ weight.T
        return ((out / out.std() - ref / ref.std()) ** 2).mean()

    for _ in range(150):
        loss = 100 * error(sensitive, reference[1]) + error(other, reference[2])
        loss = loss + 10 * complexity_term(cost(), "target", 1.0, target, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    w_sensitive, w_other = sensitive.argmax_bits()[0], other.argmax_bits()[0]
    assert w_sensitive > w_other, (sensitive.probs("w"), other.probs("w"))


# ---- derivation and the checkpoint forms ------------------------------------------------------------------------
def test_derive_gives_plain_frac_layers_and_build_restores_the_supernet():
    policy = FracPolicy(w_bits=(1, 4), a_bits=(4, 4))
    model = to_supernet_(frac_quantize_model(_mlp(), policy), [1, 2, 4])
    _one_hot_(model[2].theta_w, 1, big=3.0)
    rebuilt = build(_mlp(seed=1), policy.to_dict(), {})
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt[2].w_cands == [1, 2, 4] and torch.equal(rebuilt[2].theta_w, model[2].theta_w)
    chosen = derive_(model)
    assert chosen["2"] == [2, 4] and not list(mixed_layers(model))
    frac = frac_quantize_model(_mlp(seed=2), policy)
    frac.load_state_dict(model.state_dict())  # exactly the Form.FRAC state (no theta, no masks)
    assert frac[2].weight_bits() == 2 and frac[2].is_hard


def test_holdout_split_is_disjoint_fixed_and_sized():
    from bsq.methods.dnas.train import holdout_split

    weights, theta = holdout_split(1442, 0.2, seed=3)
    assert len(theta) == 288 and len(weights) == 1154
    assert set(weights.tolist()).isdisjoint(theta.tolist()) and len(set(weights.tolist()) | set(theta.tolist())) == 1442
    again = holdout_split(1442, 0.2, seed=3)
    assert torch.equal(again[1], theta) and not torch.equal(holdout_split(1442, 0.2, seed=4)[1], theta)


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, key",
    [
        ({"w_bits": []}, "dnas.w_bits"),
        ({"w_bits": [0, 2]}, "dnas.w_bits"),
        ({"w_bits": [2, 17]}, "dnas.w_bits"),
        ({"w_bits": [2, 2, 4]}, "dnas.w_bits"),
        ({"a_bits": [3, 3]}, "dnas.a_bits"),
        ({"lam": -1.0}, "dnas.lam"),
        ({"holdout": 0.0}, "dnas.holdout"),
        ({"holdout": 1.0}, "dnas.holdout"),
        ({"mixture": "hard"}, "dnas.mixture"),
        ({"updates": "bilevel"}, "dnas.updates"),
        ({"temperature_decay": 1.5}, "dnas.temperature_decay"),
    ],
)
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(BSQError, match=key):
        DnasConfig(**settings)


def test_search_epochs_must_leave_a_finetune_epoch():
    with pytest.raises(BSQError, match="dnas.search_epochs=4 leaves no finetune epoch"):
        DnasConfig(search_epochs=4).search_epochs_of(4)
    assert DnasConfig().search_epochs_of(10) == 9 and DnasConfig().search_epochs_of(200) == 161


def test_workflow_checks_before_any_job():
    method = get_method("dnas")
    with pytest.raises(BSQError, match="nothing sets its targets"):
        method.check_workflow({"dnas": {"match": None}, "methods": ["dnas"]})
    bad = {"dnas": {"targets": ["0.1"]}, "stages": {"dnas": {"dnas": {"w_bits": [1, 1]}}}}
    with pytest.raises(BSQError, match="dnas.w_bits"):
        method.check_workflow(bad)
    points = method.points({"dnas": {"targets": ["0.1"]}})
    assert [p.slug for p in points] == ["target-0.1"] and points[0].settings == {"dnas": {"target": 0.1}}


# ---- the stage on tiny digits data ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("dnas")
    cfg = untracked_config(root, epochs=1)
    out = default_outputs("pretrain", root / "pretrain")
    stage_spec("pretrain").run_function()({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out)
    return out["checkpoint"]


def _config(tmp_path, dnas, epochs=2):
    cfg = untracked_config(tmp_path, epochs=epochs)
    return {**cfg, "data": {**cfg["data"], "train_subset": 192}, "dnas": dnas}  # 3 steps an epoch


def _run(tmp_path, checkpoint, dnas, name="dnas", epochs=2, inputs=None):
    cfg = _config(tmp_path, dnas, epochs)
    out = default_outputs("dnas", tmp_path / name)
    stage_spec("dnas").run_function()(cfg, {"checkpoint": checkpoint, **(inputs or {})}, out)
    return out, json.loads(out["metrics"].read_text())


def test_stage_joint_softmax_meets_the_target(float_checkpoint, tmp_path):
    out, metrics = _run(tmp_path, float_checkpoint, {"target": 0.0018})
    assert metrics["budget_met"] and abs(metrics["achieved_cost"] / 0.0018 - 1) <= 0.01
    assert metrics["derive_epoch"] == 1 and metrics["best_epoch"] == 1  # 2 epochs: search 1, finetune 1
    ckpt = load_checkpoint(out["checkpoint"])
    assert ckpt["form"] == "frac" and not any("theta" in k for k in ckpt["state_dict"])
    scheme = json.loads(out["scheme"].read_text())
    assert {v for k, v in scheme.items() if not k.endswith(".act") and k not in ("conv1", "fc")} <= {1, 2, 3, 4}
    probs = [p for layer in metrics["theta_probs"].values() for p in layer.values()]
    assert probs and all(sum(p.values()) == pytest.approx(1, abs=1e-4) for p in probs)
    assert metrics["target"] == 0.0018 and metrics["budget_reachable"] is True and "target_used" not in metrics


def test_clamp_matched_moves_an_unreachable_budget_to_the_nearest_end():
    inside = clamp_matched(2.0, 1.0, 3.0, "MB", "DNAS")
    assert inside.used == 2.0 and inside.metrics() == {"budget_reachable": True}
    below = clamp_matched(0.5, 1.0, 3.0, "MB", "DNAS")
    bounds = {"budget_floor": 1.0, "budget_ceiling": 3.0}
    assert below.metrics() == {"target_used": 1.0, "budget_reachable": False, **bounds}
    above = clamp_matched(4.0, 1.0, 3.0, "MB", "DNAS")
    assert above.requested == 4.0 and above.used == 3.0 and not above.reachable
    assert clamp_matched(0.5, 1.0, None, "MB", "HAWQ").metrics() == {
        "target_used": 1.0,
        "budget_reachable": False,
        "budget_floor": 1.0,
    }


def test_stage_matched_budget_below_the_floor_runs_at_the_floor(float_checkpoint, tmp_path, caplog):
    # compression 1000: 0.032 bits per counted weight, under the all-1-bit floor (BSQ's 0.87 average bits, in
    # small): the run goes on at the floor and flags the miss instead of failing the workflow
    budget = tmp_path / "bsq_metrics.json"
    budget.write_text(json.dumps({"compression": 1000.0, "labels": {"method": "bsq", "alpha": "0.02"}}))
    with caplog.at_level(logging.WARNING, logger="bsq"):
        _, metrics = _run(tmp_path, float_checkpoint, {}, inputs={"budget": budget})
    assert metrics["budget_reachable"] is False
    assert metrics["target_used"] == metrics["budget_floor"] > metrics["target"]
    assert metrics["budget_ceiling"] > metrics["budget_floor"]
    assert metrics["achieved_cost"] <= metrics["budget_floor"] * (1 + metrics["tolerance"])  # repaired to the floor
    assert metrics["budget_met"] is False and metrics["derived_cost_rel_error"] > 0  # vs the requested target
    assert metrics["labels"]["alpha"] == "0.02"
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{metrics['target']:.6g} MB is below the smallest reachable cost" in warning


def test_stage_alternate_gumbel_bitops(float_checkpoint, tmp_path):
    dnas = {"target": 0.0005, "cost": "bitops", "updates": "alternate", "mixture": "gumbel", "a_bits": [2, 4]}
    _, metrics = _run(tmp_path, float_checkpoint, dnas)
    assert metrics["cost_kind"] == "bitops" and math.isfinite(metrics["top1"])
    assert set(metrics["theta_probs"]["layer1.0.conv1"]) == {"w", "a"}
    assert metrics["budget_met"]


def test_stage_resumes_the_search_exactly(float_checkpoint, tmp_path, monkeypatch):
    """Interrupted after the first (search) epoch, the resume file holds the super-network (form "dnas", theta's
    momentum in its buffers); the resumed run ends where the uninterrupted one does."""
    dnas = {"target": 0.0018}
    straight, _ = _run(tmp_path, float_checkpoint, dnas, "straight", epochs=3)
    cfg = _config(tmp_path, dnas, epochs=3)
    resumed = default_outputs("dnas", tmp_path / "resumed")
    with monkeypatch.context() as m:
        interrupt_after_first_epoch(m)
        with pytest.raises(KeyboardInterrupt):
            stage_spec("dnas").run_function()(cfg, {"checkpoint": float_checkpoint}, resumed)
    resume = load_checkpoint(tmp_path / "resumed" / ".dnas.resume.pt")
    assert resume["form"] == "dnas"
    stage_spec("dnas").run_function()(cfg, {"checkpoint": float_checkpoint}, resumed)
    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


@pytest.mark.parametrize(
    "dnas, message",
    [
        ({}, "needs a target"),
        ({"target": 5.0}, "outside what the candidates reach"),
        ({"target": 1e-6}, r"target 1e-06 MB is outside what the candidates reach \([0-9.e-]+ with every layer at"),
        ({"target": 0.0018, "search_epochs": 2}, "dnas.search_epochs=2 leaves no finetune epoch"),
    ],
)
def test_stage_refuses_bad_input_before_any_job(float_checkpoint, tmp_path, dnas, message):
    cfg = _config(tmp_path, dnas)
    out = default_outputs("dnas", tmp_path / "bad")
    with pytest.raises(BSQError, match=message):
        stage_spec("dnas").run_function()(cfg, {"checkpoint": float_checkpoint}, out)
    assert not any(path.exists() for path in out.values())

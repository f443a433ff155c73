"""CSQ (methods-next.md CSQ; lawsonX/CSQ bits/bitcs.py, main_cifar.py): the gated forward at a given temperature
against hand-computed values, the regulariser's sign flip around the budget, hardening = the exported bit model,
the schedule, the budget conversion, bad input, and a 2-epoch digits run with its resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bsq.checkpoint import Form, load_checkpoint
from bsq.config import load_stage_config
from bsq.errors import BSQError
from bsq.methods import get_method
from bsq.methods.csq.budget import budget_penalty, gate_share, target_from_budget
from bsq.methods.csq.config import CSQConfig
from bsq.methods.csq.layers import CSQLinear, csq_layers, csq_quantize_model, export_, set_state_
from bsq.methods.csq.train import run
from bsq.quant.convert import QuantPolicy, export_integer
from bsq.quant.layers import BitConv2d, BitLinear
from bsq.stages import default_outputs, pretrain
from tests.helpers import interrupt_after_first_epoch, untracked_config


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def two_weight_layer(plane_init: str = "digits") -> CSQLinear:
    """w = (0.6, -0.2), N = 2: S = 0.6, |w| 3 / S = (3, 1) -> p = (11, 00), n = (00, 01)."""
    linear = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.6, -0.2]]))
    layer = CSQLinear(linear, 2)
    layer.load_float_(linear.weight, None, plane_init, 0.0)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.5, -0.5]))
    return layer


# ---- forward -----------------------------------------------------------------------------------------------------
def test_forward_at_a_temperature_and_gate_state_by_hand():
    layer = two_weight_layer()
    assert layer.pweight.tolist() == [[[1.0, 1.0], [0.0, 0.0]]] and layer.nweight.tolist() == [[[0.0, 0.0], [0.0, 1.0]]]
    assert layer.scale.item() == pytest.approx(0.6)
    x = torch.tensor([[1.0, 2.0]])
    # soft gates at beta 2: m = (sig(1), sig(-1)); a set digit gives sig(2) - sig(0), place values (2/3, 1/3)
    set_state_(layer, 2.0, hard_gates=False)
    d, m0, m1 = sig(2) - 0.5, sig(1), sig(-1)
    w0 = 0.6 * (d * m0 * 2 / 3 + d * m1 / 3)
    w1 = 0.6 * (-d * m1 / 3)
    assert layer(x).item() == pytest.approx(w0 + 2 * w1, rel=1e-6)
    # hard gates (1, 0), planes still sigmoid: only the MSB counts
    set_state_(layer, 2.0, hard_gates=True)
    assert layer(x).item() == pytest.approx(0.6 * d * 2 / 3, rel=1e-6)
    # hard gates and planes: w = 0.6 (1 * 2/3, 0) -> 0.4
    set_state_(layer, 2.0, hard_gates=True, hard_planes=True)
    assert layer(x).item() == pytest.approx(0.4, rel=1e-6)


def test_signed_init_approaches_the_quantized_weight():
    layer = two_weight_layer("signed")
    assert layer.pweight.tolist() == [[[1.0, 1.0], [-1.0, -1.0]]]
    set_state_(layer, 50.0, hard_gates=False)
    with torch.no_grad():
        layer.gate.fill_(1.0)  # m = sig(50) ~ 1
    assert layer.weight_value().tolist()[0] == pytest.approx([0.6, -0.2], rel=1e-5)


# ---- regulariser -------------------------------------------------------------------------------------------------
def _gate_grad(gate: float, target: float) -> torch.Tensor:
    layer = two_weight_layer()
    with torch.no_grad():
        layer.gate.fill_(gate)
    set_state_(layer, 1.0, hard_gates=False)
    value, _ = budget_penalty(nn.Sequential(layer), 0.1, target, "gates")
    value.backward()
    return layer.gate.grad


def test_regulariser_prunes_above_and_grows_below_the_budget():
    # s = 0: m = 0.5 counts open, R1 = 1; target 1 of N = 2: coefficient 0.1 (1 - 0.5) = 0.05,
    # dm/ds = beta sig'(0) = 0.25 -> +0.0125 per gate: SGD lowers s (prunes)
    assert _gate_grad(0.0, 1.0).tolist() == pytest.approx([0.0125, 0.0125])
    # s = -1: every gate closed, R1 = 0; coefficient 0.1 (0 - 0.5) = -0.05, dm/ds = sig(-1) sig(1)
    assert _gate_grad(-1.0, 1.0).tolist() == pytest.approx([-0.05 * sig(-1) * sig(1)] * 2)
    # exactly at the budget (R1 = 1 = 2 / 2): no push
    assert _gate_grad(0.0, 2.0).tolist() == pytest.approx([0.0, 0.0])


def test_share_weighted_by_parameters():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1))  # 32 and 4 weights
    csq_quantize_model(model, QuantPolicy(nbits=2))
    with torch.no_grad():
        model[0].gate.copy_(torch.tensor([1.0, -1.0]))  # 1 of 2 open
        model[1].gate.copy_(torch.tensor([-1.0, -1.0]))  # 0 of 2 open
    assert gate_share(model, "gates") == pytest.approx(1 / 4)
    assert gate_share(model, "params") == pytest.approx(32 * 1 / (36 * 2))


# ---- hardening and export ----------------------------------------------------------------------------------------
def _random_csq_model(nbits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    csq_quantize_model(model, QuantPolicy(nbits=nbits))
    with torch.no_grad():
        for _, layer in csq_layers(model):
            layer.pweight.copy_(torch.randn_like(layer.pweight))
            layer.nweight.copy_(torch.randn_like(layer.nweight))
            layer.gate.copy_(torch.tensor([-1.0, 1.0, -0.5, 2.0])[:nbits])  # MSB closed, a closed middle bit
    return model


def test_hardened_model_equals_its_bit_checkpoint_export():
    model = _random_csq_model()
    x = torch.randn(7, 1, 4, 4)
    set_state_(model, 200.0, hard_gates=True, hard_planes=True)
    conv = model[0]
    expected = ((conv.pweight > 0).long() - (conv.nweight > 0).long()) * torch.tensor([0, 4, 0, 1])  # gated 2^(3-b)
    hardened = model(x)
    export_(model, compact=False)
    assert isinstance(model[0], BitConv2d) and isinstance(model[3], BitLinear)
    assert torch.equal(model(x), hardened)  # the same outputs, bit for bit
    ints = export_integer(model)
    assert torch.equal(ints["0"].values, expected.sum(-1))  # integer weights of the gated binary planes
    assert ints["0"].bits == 4
    from bsq.checkpoint import model_form

    assert model_form(model) == Form.BITS


def test_compact_export_drops_closed_msb_planes():
    model = _random_csq_model()
    x = torch.randn(7, 1, 4, 4)
    set_state_(model, 200.0, hard_gates=True, hard_planes=True)
    hardened = model(x)
    export_(model, compact=True)
    assert model[0].nbits == 3  # the closed MSB is gone; the closed third bit stays (in the span)
    assert torch.allclose(model(x), hardened, rtol=1e-5, atol=1e-6)


# ---- schedule, budget, bad input ---------------------------------------------------------------------------------
def test_temperature_schedule():
    s = CSQConfig(ticket=4).schedule(6)
    assert s.beta(0) == pytest.approx(200 ** (1 / 5)) and s.beta(4) == pytest.approx(200.0)
    assert s.beta(5) > 200  # grows on after the ticket, as main_cifar.py
    assert [s.hard(e) for e in range(6)] == [False] * 4 + [True] * 2
    assert CSQConfig().schedule(600).ticket == 594  # README --epochs 600 --ticket 595 (1-based)
    r = CSQConfig(ticket=6, rounds=3, rewind=1).schedule(9)  # 3 soft rounds of 2 epochs, hard round of 3
    assert [r.beta(e) for e in (0, 1, 2, 6, 8)] == pytest.approx([1, 200, 1, 1, 200])
    assert [e for e in range(9) if r.resets_gates(e)] == [2, 4]
    assert r.snapshots(1) and r.rewinds(6) and not r.rewinds(5)


def test_target_from_a_bsq_budget():
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2))  # weights 40 + 8, biases 4 + 2 at N = 8
    csq_quantize_model(model, QuantPolicy(nbits=8))
    # compression 8 -> 4 average bits over 54 entries: (4 * 54 - 6 * 8) / 48 = 3.5
    assert target_from_budget({"compression": 8.0}, "compression", model) == pytest.approx(3.5)
    assert target_from_budget({"avg_bits": 4.0}, "avg_bits", model) == pytest.approx(3.5)
    assert target_from_budget({"size_mb": 4 * 54 / 8e6}, "size", model) == pytest.approx(3.5)
    with pytest.raises(BSQError, match="outside what CSQ's gates reach"):
        target_from_budget({"compression": 2.0}, "compression", model)  # 16 bits > N


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"target": 9.0}, "csq.target"),
        ({"target": 0.0}, "csq.target"),
        ({"nbits": 0}, "csq.nbits"),
        ({"nbits": 17}, "csq.nbits"),
        ({"lmbda": -0.1}, "csq.lmbda"),
        ({"final_temp": 1.0}, "csq.final_temp"),
        ({"share": "size"}, "csq.share"),
        ({"ticket": 2}, "csq.ticket"),  # = optim.epochs: no hard epoch
        ({"ticket": 1, "rounds": 2}, "csq.rounds"),  # the rounds' temperature would end before the ticket
    ],
)
def test_bad_input_names_the_key_when_the_config_is_read(settings, key, tmp_path):
    cfg = {**untracked_config(tmp_path, epochs=2), "csq": {"target": 2.0, **settings}}
    with pytest.raises(BSQError, match=key.replace(".", r"\.")):
        load_stage_config("csq", cfg)


def test_workflow_targets_outside_the_reach_fail_before_any_job():
    method = get_method("csq")
    with pytest.raises(BSQError, match="csq.target"):
        method.check_workflow({"methods": ["csq"], "csq": {"match": None, "targets": ["12"]}})
    with pytest.raises(BSQError, match="csq.targets"):
        method.check_workflow({"methods": ["csq"], "csq": {"match": None}})
    points = method.points({"alphas": ["5e-3"], "csq": {"match": "compression", "targets": ["2"]}})
    assert [p.slug for p in points] == ["alpha-5e-3", "target-2"]
    assert points[0].settings == {"csq": {"match": "compression", "share": "params"}} and points[0].budget_of


# ---- the stage on digits -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("csq")
    cfg = untracked_config(root, epochs=1)
    out = default_outputs("pretrain", root / "pretrain")
    pretrain.run({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out)
    return out["checkpoint"]


def test_two_epoch_digits_run_exports_an_exact_bit_model_and_resumes(float_checkpoint, tmp_path, monkeypatch):
    cfg = {**untracked_config(tmp_path, epochs=2), "csq": {"target": 2.0, "ticket": 1, "lmbda": 0.5}}
    straight = default_outputs("csq", tmp_path / "straight")
    run(cfg, {"checkpoint": float_checkpoint}, straight)
    metrics = json.loads(straight["metrics"].read_text())
    ckpt = load_checkpoint(straight["checkpoint"])
    assert ckpt["form"] == "bits"
    assert set(json.loads(straight["scheme"].read_text())) == set(ckpt["precisions"])  # every exported tensor
    for key in ("top1", "soft_top1", "avg_bits", "csq_avg_bits", "target", "achieved_cost", "compression"):
        assert math.isfinite(metrics[key]), key
    assert metrics["cost_kind"] == "avg_bits" and isinstance(metrics["budget_met"], bool)
    assert metrics["achieved_cost"] == metrics["avg_bits"] and 0 <= metrics["csq_avg_bits"] <= 8
    gates = metrics["gates"]
    assert metrics["csq_avg_bits"] == pytest.approx(8 * sum(map(sum, gates.values())) / (8 * len(gates)))

    resumed = default_outputs("csq", tmp_path / "resumed")
    with monkeypatch.context() as m:
        interrupt_after_first_epoch(m)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, {"checkpoint": float_checkpoint}, resumed)
    assert load_checkpoint(tmp_path / "resumed" / ".csq.resume.pt")["form"] == "csq"
    run(cfg, {"checkpoint": float_checkpoint}, resumed)
    a, b = ckpt, load_checkpoint(resumed["checkpoint"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_rounds_reset_the_gates_and_rewind_the_planes():
    from bsq.methods.csq.train import _reset_gates_, _rewind_, _snapshot_

    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    csq_quantize_model(model, QuantPolicy(nbits=2), rewindable=True)
    layer = model[0]
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.01, -0.5]))
    _reset_gates_(model, 200.0, 0.0)  # s <- min(beta s, s0)
    assert layer.gate.tolist() == pytest.approx([0.0, -100.0])
    _snapshot_(model)
    kept = layer.pweight.detach().clone()
    with torch.no_grad():
        layer.pweight.add_(1.0)
    _rewind_(model)
    assert torch.equal(layer.pweight, kept)


def test_multi_round_run_on_digits(float_checkpoint, tmp_path):
    cfg = {**untracked_config(tmp_path, epochs=5), "csq": {"target": 3.0, "ticket": 4, "rounds": 2, "rewind": 1}}
    out = default_outputs("csq", tmp_path / "rounds")
    run(cfg, {"checkpoint": float_checkpoint}, out)
    import pandas as pd

    history = pd.read_csv(out["history"])
    assert history["beta"].tolist() == pytest.approx([1, 200, 1, 200, 1])
    assert history["hard_gates"].tolist() == [0, 0, 0, 0, 1]
    assert load_checkpoint(out["checkpoint"])["form"] == "bits"


def test_hardened_resnet_equals_its_saved_bit_checkpoint():
    """Through the file: the exported ResNet-8 saved as a bits checkpoint and rebuilt from it alone gives the
    hardened CSQ model's outputs exactly (eval mode, 4-bit activations, float shortcuts)."""
    from bsq.checkpoint import load_model, make_checkpoint
    from bsq.models import create_model

    torch.manual_seed(1)
    args = {"arch": "resnet8", "num_classes": 10, "act_bits": 4, "in_channels": 1, "width": 4}
    model = create_model(**{k: v for k, v in args.items() if k != "arch"}, name="resnet8").eval()
    policy = {"nbits": 3, "quantize_first": True, "quantize_last": True, "quantize_shortcuts": False}
    csq_quantize_model(model, QuantPolicy(**policy))
    with torch.no_grad():
        for i, (_, layer) in enumerate(csq_layers(model)):
            layer.pweight.add_(torch.randn_like(layer.pweight))
            layer.gate.copy_(torch.tensor([1.0, -1.0, 1.0]) * (-1) ** i)
    set_state_(model, 200.0, hard_gates=True, hard_planes=True)
    x = torch.randn(4, 1, 8, 8)
    hardened = model(x)
    export_(model, compact=False)
    rebuilt = load_model(make_checkpoint(model, stage="csq", model_args=args, policy=policy)).eval()
    assert torch.equal(rebuilt(x), hardened)

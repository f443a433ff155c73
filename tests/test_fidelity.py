"""The fidelity switches of issue 16 change behaviour exactly as the authors' code does (bsq.md §3, §5; fracbits.md
§1.3): each test runs both values of one switch on a hand-built case whose expected outcome is computed by hand or
is an invariant, never by the code under test."""

from __future__ import annotations

import json

import pytest
import torch

from bsq.models import create_model
from bsq.quant.convert import QuantPolicy, clamp_finetune_, quantize_model, set_form_


def _latent_resnet8(fill: float) -> torch.nn.Module:
    """A ResNet-8 in finetune (latent) form with every parameter set to `fill`."""
    model = quantize_model(create_model("resnet8", act_bits=4), QuantPolicy(nbits=2))
    set_form_(model, "latent")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    return model


@pytest.mark.parametrize("fill", [3.0, -3.0])
def test_finetune_clamp_latent_touches_only_latent_weights_official_every_weight_but_bn(fill):
    """Spec §5.2: the authors clamp every parameter named `weight` without `bn` to [-1, 1], so the float shortcut
    conv and the shortcut BN's gamma (`downsample.1.weight`, no `bn` in its name) too; ours only the latent V."""
    latent, official = _latent_resnet8(fill), _latent_resnet8(fill)
    clamp_finetune_(latent, "latent")
    clamp_finetune_(official, "official")
    bound = 1.0 if fill > 0 else -1.0
    for model in (latent, official):
        assert torch.all(model.layer1[0].conv1.weight == bound) and torch.all(model.fc.weight == bound)
        assert model.layer1[0].conv1.scale.item() == fill and torch.all(model.fc.bias == fill)  # scale, latent bias
        assert torch.all(model.bn1.weight == fill) and torch.all(model.layer1[0].bn2.weight == fill)  # `bn` names
        assert torch.all(model.layer2[0].downsample[1].bias == fill)  # no `weight` in the name
    for model, expected in ((latent, fill), (official, bound)):
        shortcut_conv, shortcut_gamma = model.layer2[0].downsample[0].weight, model.layer2[0].downsample[1].weight
        assert torch.all(shortcut_conv == expected) and torch.all(shortcut_gamma == expected)


class _Batches(list):
    """A one-batch loader (the Trainer only needs iteration, len and set_epoch)."""

    def set_epoch(self, epoch: int) -> None:
        pass


@pytest.mark.parametrize("includes_start", [False, True])
def test_best_includes_start_keeps_the_untrained_state_when_training_only_hurts(includes_start):
    """Spec §5.2: the authors' epoch 0 (pruned, not finetuned) is a best-epoch candidate. A 1-d problem the start
    weights solve (test top-1 100 %), trained on flipped labels with lr 10: every trained epoch scores 0 %."""
    from bsq.config import OptimConfig
    from bsq.engine import Distributed, Trainer, evaluate

    x = torch.tensor([[1.0], [-1.0]])
    model = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    train, test = _Batches([(x, torch.tensor([1, 0]))]), _Batches([(x, torch.tensor([0, 1]))])
    optim = OptimConfig(epochs=2, lr=10.0, momentum=0.0, weight_decay=0.0, schedule="constant")
    trainer = Trainer(model, train, test, optim, seed=0, dist=Distributed(), keep_best=True)
    if includes_start:
        trainer.add_start_candidate(evaluate(model, test, torch.device("cpu")))
    result = trainer.fit()
    assert [row["test_top1"] for row in result.history] == [0.0, 0.0]
    # One SGD step on the flipped labels: dCE/dw = (sigmoid(2), -sigmoid(2)) for both samples, so w0 -+ 10 sigmoid(2).
    step = 10.0 * torch.sigmoid(torch.tensor(2.0))
    expected = torch.tensor([[1.0], [-1.0]]) if includes_start else torch.stack([1 - step, step - 1]).reshape(2, 1)
    assert result.best["epoch"] == (-1 if includes_start else 0)
    assert result.best["test_top1"] == (100.0 if includes_start else 0.0)
    torch.testing.assert_close(result.best_state["weight"], expected)


@pytest.mark.parametrize("form", ["bits", "latent"])
def test_dropped_bias_leaves_the_forward_and_gets_no_update(form):
    """bsq.md §5.2 erratum: with `pbias = None` the authors' fc is x W^T alone, and the bias gets no gradient, so
    SGD (momentum, weight decay) leaves it as it was; bringing it back restores x W^T + b."""
    from bsq.quant.layers import BitLinear

    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0]]))
        linear.bias.copy_(torch.tensor([1.0, -1.0]))
    layer = BitLinear.from_float(linear, nbits=1, bias_nbits=1)  # 1 bit holds these weights and bias exactly
    set_form_(layer, form)
    x = torch.tensor([[2.0, 1.0, 3.0]])
    layer.drop_bias_(True)
    out = layer(x)
    torch.testing.assert_close(out, torch.tensor([[1.0, 4.0]]))  # x W^T by hand
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    out.sum().backward()
    optimizer.step()
    for name, param in layer.named_parameters():
        frozen = "bias" in name  # the planes / latent bias and biasscale
        assert torch.equal(param, before[name]) == frozen, name
    layer.drop_bias_(False)
    assert all(p.requires_grad for p in layer.parameters())
    with_bias = layer(x)
    layer.drop_bias_(True)
    torch.testing.assert_close(with_bias - layer(x), torch.tensor([[1.0, -1.0]]))  # the bias, as it was


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A pruned bit checkpoint of the tiny digits ResNet-8 (pretrain, search and prune of one epoch each)."""
    from bsq.methods.bsq import prune, search
    from bsq.stages import default_outputs, pretrain
    from tests.helpers import tiny_config

    root = tmp_path_factory.mktemp("pruned")
    cfg = {**tiny_config(root, epochs=1), "tracking": {"enabled": False}}
    out = {stage: default_outputs(stage, root / stage) for stage in ("pretrain", "search", "prune")}
    pretrain.run(cfg, {}, out["pretrain"])
    search.run(cfg, {"checkpoint": out["pretrain"]["checkpoint"]}, out["search"])
    prune.run(cfg, {"checkpoint": out["search"]["checkpoint"]}, out["prune"])
    return root, cfg, out["prune"]["checkpoint"]


def _finetune(pruned, name: str, preset: str) -> tuple[dict, dict]:
    """One finetune epoch of the pruned model under `preset`: its metrics and saved state dict."""
    import json

    from bsq.checkpoint import load_checkpoint
    from bsq.methods.bsq import finetune
    from bsq.stages import default_outputs

    root, cfg, checkpoint = pruned
    outputs = default_outputs("finetune", root / name)
    finetune.run({**cfg, "preset": preset}, {"checkpoint": checkpoint}, outputs)
    return json.loads(outputs["metrics"].read_text()), load_checkpoint(outputs["checkpoint"])["state_dict"]


def test_finetune_stage_switches_fc_bias_and_clamp(pruned):
    """The stage wires the switches: official-bin saves the fc bias exactly as pruned and clamps the shortcut BN's
    gamma to [-1, 1]; default trains the bias (its scale moves) and leaves gamma alone."""
    from bsq.checkpoint import load_checkpoint

    start = load_checkpoint(pruned[2])["state_dict"]
    ours, ours_state = _finetune(pruned, "default", "default")
    authors, authors_state = _finetune(pruned, "official", "official-bin")
    for key in ("fc.pbias", "fc.nbias", "fc.biasscale"):
        assert torch.equal(authors_state[key], start[key]), key
    assert not torch.equal(ours_state["fc.biasscale"], start["fc.biasscale"])
    gamma = "layer2.0.downsample.1.weight"  # the shortcut BN's gamma: above 1 after the search here
    assert start[gamma].max() > 1.0 and ours_state[gamma].max() > 1.0 >= authors_state[gamma].max()
    assert "finetune_form_top1" in authors and "finetune_form_top1" not in ours
    # best_includes_start: the start state wins ties (the authors' `acc > best_acc`), so best_epoch -1 exactly
    # when no trained epoch beat the initial accuracy.
    assert (authors["best_epoch"] == -1) == (authors["initial_top1"] >= authors["final_top1"])
    assert ours["best_epoch"] == 0


@pytest.mark.parametrize("zeroed_layers", ["zero", "ternary"])
def test_scratch_layer_bsq_zeroed_stays_zero_or_becomes_ternary_from_float(zeroed_layers):
    """Spec §8.1: the authors' `convert.py --dict` quantizes a layer BSQ zeroed at N = 1 from the float weights
    (levels round(W / max|W|) in {-1, 0, 1}); ours keeps it at 0 bits, so the model has the scheme's size."""
    from bsq.methods.bsq.finetune import quantize_to_scheme_
    from bsq.quant.convert import export_scheme

    torch.manual_seed(0)
    model = create_model("resnet8", act_bits=4)
    conv, fc_bias = model.layer1[0].conv1.weight.detach().clone(), model.fc.bias.detach().clone()
    scheme = {name: 2 for name in export_scheme(quantize_model(create_model("resnet8", act_bits=4)))}
    scheme.update({"layer1.0.conv1": 0, "fc.bias": 0})
    quantize_to_scheme_(model, QuantPolicy(), scheme, zeroed_layers)
    set_form_(model, "latent")  # what finetune trains: an all-zero 1-bit tensor becomes N = 0 here
    layer, fc = model.layer1[0].conv1, model.fc
    if zeroed_layers == "zero":
        assert layer.precision() == 0 and fc.precision("bias") == 0
        assert not layer.integer_levels().any() and not fc.integer_levels("bias").any()
    else:
        assert layer.precision() == 1 and fc.precision("bias") == 1
        assert torch.equal(layer.integer_levels(), torch.round(conv / conv.abs().max()).long())
        assert torch.equal(fc.integer_levels("bias"), torch.round(fc_bias / fc_bias.abs().max()).long())
        assert set(layer.integer_levels().unique().tolist()) == {-1, 0, 1}
    assert model.layer1[0].conv2.precision() == 2  # the other layers as the scheme says, either way


def _q(u: torch.Tensor, k: int) -> torch.Tensor:
    """Q_k(u) = round((2^k - 1) u) / (2^k - 1), fracbits.md §1.4, written out independently."""
    return torch.round((2**k - 1) * u) / (2**k - 1)


@pytest.mark.parametrize("lam", [3.0, 3.4])
def test_fracbits_blend_ceil_loses_the_lambda_gradient_only_at_integer_lambda(lam):
    """fracbits.md §1.3: the authors blend Q_floor(lam) and Q_ceil(lam), which coincide at an integer lam, so the
    task loss gives lam no gradient there; ours blends Q_l and Q_{l+1} (gradient <dL/dQ, Q_{l+1} - Q_l>)."""
    from bsq.quant.frac import frac_quantize_unit

    u = torch.linspace(0, 1, 23)
    g = torch.linspace(-1, 2, 23)  # dL/dQ of the loss <g, Q>
    out = {}
    for blend in ("floor", "ceil"):
        lam_param = torch.tensor(lam, requires_grad=True)
        q = frac_quantize_unit(u, lam_param, 1, 8, 0.0, blend)
        (g * q).sum().backward()
        out[blend] = (q.detach(), lam_param.grad.item())
    f = lam - 3
    expected_q = (1 - f) * _q(u, 3) + f * _q(u, 4)
    step_gradient = (g * (_q(u, 4) - _q(u, 3))).sum().item()
    for blend in ("floor", "ceil"):
        torch.testing.assert_close(out[blend][0], expected_q)
    assert out["floor"][1] == pytest.approx(step_gradient, rel=1e-5) and abs(step_gradient) > 0.01
    assert out["ceil"][1] == (0.0 if lam == 3.0 else pytest.approx(step_gradient, rel=1e-5))


def test_fracbits_blend_reaches_every_layer_and_the_checkpoint_policy():
    from bsq.quant.frac import FracPolicy, frac_layers, frac_quantize_model

    policy = FracPolicy(blend="ceil")
    model = frac_quantize_model(create_model("resnet8", act_bits=None), policy)
    assert {layer.blend for _, layer in frac_layers(model)} == {"ceil"}
    assert FracPolicy(**policy.to_dict()).blend == "ceil"  # what a checkpoint stores and rebuilds


@pytest.mark.parametrize(("best_epoch", "kept"), [("after_freeze", 2), ("all", 0)])
def test_fracbits_best_epoch_all_can_keep_a_search_epoch(monkeypatch, best_epoch, kept):
    """fracbits.md §1.7 step 5: the authors keep the best test epoch of the whole run; ours only those after the
    hard assignment (here after 2 search epochs). Scripted test top-1: the search epoch 0 scores best."""
    from bsq import engine
    from bsq.config import OptimConfig
    from bsq.methods.fracbits.config import FracBitsConfig

    scores = iter([90.0, 50.0, 60.0, 55.0])
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: {"loss": 0.0, "top1": next(scores), "top5": 100.0})
    x = torch.tensor([[1.0], [-1.0]])
    batches = _Batches([(x, torch.tensor([0, 1]))])
    optim = OptimConfig(epochs=4, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant")
    best_after = FracBitsConfig(best_epoch=best_epoch).best_after_of(search_epochs=2)
    trainer = engine.Trainer(
        torch.nn.Linear(1, 2), batches, batches, optim, seed=0, dist=engine.Distributed(), best_after=best_after
    )
    assert trainer.fit().best["epoch"] == kept


@pytest.mark.parametrize("lr_step", ["epoch", "iteration"])
def test_fracbits_lr_step_iteration_runs_the_cosine_within_each_epoch(lr_step):
    """fracbits.md §1.9: the authors' cosine steps every iteration, lr(e, k) = lr/2 (1 + cos(pi (e S + k) / (E S)));
    ours sets the epoch's value at its start and keeps it for all S steps."""
    import math

    from bsq import engine
    from bsq.config import OptimConfig
    from bsq.methods.fracbits.config import FracBitsConfig

    x = torch.tensor([[1.0], [-1.0]])
    batches = _Batches([(x, torch.tensor([0, 1]))] * 3)
    optim = OptimConfig(epochs=2, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="cosine")
    per_step = FracBitsConfig(lr_step=lr_step).lr_step == "iteration"
    seen: list[float] = []
    hooks = engine.Hooks(after_step=lambda m: seen.append(trainer.optimizer.param_groups[0]["lr"]))
    trainer = engine.Trainer(
        torch.nn.Linear(1, 2),
        batches,
        batches,
        optim,
        seed=0,
        dist=engine.Distributed(),
        hooks=hooks,
        lr_per_step=per_step,
    )
    trainer.fit()
    steps, epochs = 3, 2
    expected = [
        0.05 * (1 + math.cos(math.pi * ((e * steps + k) if per_step else e * steps) / (epochs * steps)))
        for e in range(epochs)
        for k in range(steps)
    ]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert (len(set(seen)) == 6) == per_step  # per epoch: one value for each epoch's three steps


@pytest.mark.parametrize("project", ["step", "none"])
def test_fracbits_project_none_leaves_lambda_past_its_range_but_uses_it_clamped(project):
    """fracbits.md §1.3: the authors clamp lambda to [b_min, b_max] only where it is used; ours also projects the
    parameter after each step. A lambda pushed to 9.5 in [1, 8] quantizes and costs as 8 bits either way."""
    from bsq.methods.fracbits.config import FracBitsConfig
    from bsq.methods.fracbits.train import projection
    from bsq.quant.frac import FracPolicy, frac_layers, frac_quantize_model

    model = frac_quantize_model(create_model("resnet8", act_bits=None), FracPolicy(w_bits=(1, 8)))
    name, layer = next((n, lay) for n, lay in frac_layers(model) if lay.searches_weight)
    with torch.no_grad():
        layer.wbits.fill_(8.0)
    at_eight = layer.quantized_weight().detach().clone()
    with torch.no_grad():
        layer.wbits.fill_(9.5)  # where an optimizer step left it
    hook = projection(FracBitsConfig(project=project).project)
    if hook is not None:
        hook(model)
    assert layer.wbits.max().item() == (8.0 if project == "step" else 9.5)
    assert layer.weight_bits() == 8
    torch.testing.assert_close(layer.quantized_weight(), at_eight)


def _planes_of(magnitudes: list[int], nbits: int, scale: float = 1.0):
    from bsq.quant import bits as B

    pos = B.int_to_planes(torch.tensor(magnitudes), nbits)
    return B.Planes(pos, torch.zeros_like(pos), torch.tensor(scale), nbits)


@pytest.mark.parametrize("overflow", ["grow", "saturate"])
def test_overflow_grows_a_bit_or_saturates(overflow):
    """Spec §3.1: a relaxed 2-bit weight u = 2 e_0 = 4/3 re-quantizes to I = 4 > 3. HEAD adds a bit (N = 3, s * 7/3,
    the value 4/3 s kept); the paper-era code saturates at I = 3 (N = 2, s unchanged). u = 1/3 is I = 1 either way."""
    from bsq.quant import bits as B

    pos = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    planes = B.Planes(pos, torch.zeros_like(pos), torch.tensor(1.5), 2)
    out = B.requantize(planes, maxbit=8, grow=overflow == "grow")
    ints = (out.pos * 2.0 ** torch.arange(out.nbits - 1, -1, -1)).sum(-1)
    if overflow == "grow":
        assert out.nbits == 3 and ints.tolist() == [4, 1] and out.scale.item() == pytest.approx(1.5 * 7 / 3)
    else:
        assert out.nbits == 2 and ints.tolist() == [3, 1] and out.scale.item() == 1.5
    fits = _planes_of([3, 1], 2, 1.5)  # no overflow: the two agree
    same = B.requantize(fits, 8, grow=overflow == "grow")
    assert same.nbits == 2 and torch.equal(same.pos, fits.pos) and same.scale.item() == 1.5


@pytest.mark.parametrize(
    ("shares", "nbits", "levels"), [("once", 1, [1] * 9 + [0]), ("recompute", 3, [7, 7, 4, 2] + [1] * 5 + [0])]
)
def test_prune_shares_once_folds_to_1_bit_recompute_stops_at_3(shares, nbits, levels):
    """Spec §3.2 with threshold 25 %: 4-bit magnitudes, bit 3 (MSB) set on 20 % of entries, bit 2 on 10 %, bit 1 on
    10 %, bit 0 on 50 %. The authors take every share from the tensor as given: 20, 10, 10 < 25, so three MSB folds
    leave 1 bit, set wherever any bit was. Recomputed after the first fold, bit 2 is set on 20 + 10 = 30 % >= 25:
    3 bits stay, the folded entries saturated at 7. s scales by (2^N - 1) / 15 either way."""
    from bsq.quant import bits as B

    magnitudes = [8, 8, 4, 2, 1, 1, 1, 1, 1, 0]
    out = B.prune(_planes_of(magnitudes, 4, 1.5), threshold=25.0, shares=shares)
    ints = (out.pos * 2.0 ** torch.arange(out.nbits - 1, -1, -1)).sum(-1)
    assert out.nbits == nbits and ints.tolist() == levels
    assert out.scale.item() == pytest.approx(1.5 * (2**nbits - 1) / 15)


# ---- every run records its preset and switch values; the tables say which --------------------------------------
def test_a_run_records_its_preset_and_every_switch(tmp_path):
    from bsq.presets import PRESETS, SWITCHES
    from bsq.stages import default_outputs, pretrain
    from tests.helpers import mlflow_runs, tiny_config

    cfg = {**tiny_config(tmp_path, epochs=1), "preset": "official-bin", "fracbits": {"blend": "floor"}}
    out = default_outputs("pretrain", tmp_path / "p")
    pretrain.run(cfg, {}, out)
    for name in ("metrics", "run"):
        record = json.loads(out[name].read_text())
        assert record["preset"] == "official-bin"
        assert set(record["switches"]) == set(SWITCHES)
        expected = {**PRESETS["official-bin"], "fracbits.blend": "floor"}  # the explicit switch wins
        assert record["switches"] == expected
    runs = mlflow_runs(tmp_path)
    assert runs["tags.bsq.preset"].tolist() == ["official-bin"]
    assert runs["params.preset"].tolist() == ["official-bin"]
    assert "params.bsq.clamp" not in runs  # a run's params are its own stage's settings (a search run logs it)


def test_the_table_footnote_names_each_preset_and_the_switches_set_against_it(tmp_path):
    from bsq.presets import PRESETS
    from bsq.report import collect_runs, fidelity_note, run_record

    def metrics(name, method, preset, **switch):
        path = tmp_path / f"{name}.json"
        labels = {"dataset": "digits", "arch": "resnet8", "method": method, "seed": 1}
        payload = {"labels": labels, "preset": preset, "switches": {**PRESETS[preset], **switch}, "top1": 90.0}
        path.write_text(json.dumps(payload))
        return path

    runs = collect_runs(
        [
            run_record(metrics("e1", "bsq", "official-bin"), train_metrics=metrics("t1", "bsq", "official-bin")),
            run_record(metrics("e2", "uniform", "default"), train_metrics=metrics("t2", "uniform", "default")),
            run_record(
                metrics("e3", "fracbits", "official-bin"),
                train_metrics=metrics("t3", "fracbits", "official-bin", **{"fracbits.blend": "floor"}),
            ),
        ]
    )
    note = fidelity_note(runs)
    assert "preset `default`: Uniform QAT" in note
    assert "preset `official-bin`: BSQ" in note
    assert 'preset `official-bin`, with {"fracbits.blend": "floor"}: FracBits' in note


# ---- fracbits.bisection: the hard assignment's offset search ------------------------------------------------------
def _linear(slope: float):
    return lambda delta: 100.0 + slope * delta


@pytest.mark.parametrize(
    "cost_at, target, trials, expected",
    [
        # 100 -> 50 -> 75 -> 87.5 -> 81.25 -> 78.125 -> 79.6875, within 1 % of 80: stop (worked by hand)
        (_linear(100.0), 80.0, 10, -0.203125),
        (_linear(100.0), 150.0, 10, 0.0),  # under budget at 0: lower = higher = 0, the offset stays 0
        (_linear(10.0), 50.0, 10, -(1 - 2**-10)),  # far over budget: ten halvings toward -1, never beyond
        # a step cost: -0.5 costs 79 (1.25 % off), then -0.25 costs 100 again; the LAST offset is kept, not the closest
        (lambda d: 100.0 if d > -0.4 else 79.0, 80.0, 2, -0.25),
    ],
)
def test_official_offset_search_is_the_authors_bisection(cost_at, target, trials, expected):
    from bsq.methods.fracbits.cost import official_offset

    assert official_offset(cost_at, target, 0.01, trials) == expected


@pytest.mark.parametrize("bisection", ["extended", "official"])
def test_bisection_switch_under_budget_at_zero(bisection):
    """A rounded policy 20 % under its budget: the authors' search stays at offset 0 (their [-1, 0] cannot raise
    bits); ours brackets above 0 and lands within 1 %."""
    from bsq.methods.fracbits.cost import CostModel, hard_assign
    from bsq.quant.frac import FracPolicy, frac_layers, frac_quantize_model

    torch.manual_seed(0)
    model = frac_quantize_model(
        create_model("resnet8", 10, act_bits=None, width=8), FracPolicy(a_bits=None, granularity="kernel")
    )
    with torch.no_grad():
        for _, layer in frac_layers(model):
            if layer.searches_weight:
                layer.wbits.uniform_(2, 5)
    cost = CostModel(model, (3, 32, 32), "size")
    target = cost(offset=0.0).item() * 1.2
    result = hard_assign(model, cost, target, 0.01, 10, bisection)
    if bisection == "official":
        assert result.offset == 0.0 and result.cost < 0.99 * target
    else:
        assert result.offset > 0 and abs(result.relative_error) <= 0.01

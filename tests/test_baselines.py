"""The FracBits and uniform-QAT stages on the embedded digits data with a tiny ResNet-8: equal-cost matching with a
BSQ run, the one-run schedule, outputs the evaluate stage measures alike, MLflow labels and lineage, exact resume
across the hard assignment, and bad input that fails before anything is written."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bsq.checkpoint import load_checkpoint
from bsq.errors import BSQError
from bsq.methods.bsq import prune, search
from bsq.methods.fracbits import train as fracbits
from bsq.methods.uniform import train as uniform
from bsq.quant.frac import frac_layers
from bsq.stages import default_outputs, evaluate, pretrain
from tests.helpers import interrupt_after_first_epoch, tiny_config
from tests.helpers import mlflow_runs as _runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """pretrain -> BSQ search -> prune (the budget) -> FracBits at that compression; uniform W2; evaluations."""
    root = tmp_path_factory.mktemp("baselines")
    cfg = tiny_config(root)
    out = {stage: default_outputs(stage, root / stage) for stage in ("pretrain", "search", "prune", "fracbits")}
    out["uniform"] = default_outputs("uniform", root / "uniform")
    out["eval_fracbits"] = default_outputs("evaluate", root / "eval_fracbits")
    out["eval_uniform"] = default_outputs("evaluate", root / "eval_uniform")
    pretrain.run({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out["pretrain"])
    float_model = {"checkpoint": out["pretrain"]["checkpoint"]}
    search.run({**cfg, "bsq": {"alpha": 2.0, "requant_interval": 1}}, float_model, out["search"])
    prune.run(cfg, {"checkpoint": out["search"]["checkpoint"]}, out["prune"])
    fb_cfg = {**cfg, "optim": {"epochs": 6}, "fracbits": {"prune_channels": True}}
    fracbits.run(fb_cfg, {**float_model, "budget": out["prune"]["metrics"]}, out["fracbits"])
    uniform.run({**cfg, "optim": {"epochs": 2}, "qat": {"bits": 2}}, float_model, out["uniform"])
    for name in ("fracbits", "uniform"):
        evaluate.run(cfg, {"checkpoint": out[name]["checkpoint"]}, out[f"eval_{name}"])
    return root, out


def _metrics(out, name):
    return json.loads(out[name]["metrics"].read_text())


def test_fracbits_matches_the_bsq_runs_compression(runs):
    _, out = runs
    bsq_run, fb = _metrics(out, "prune"), _metrics(out, "fracbits")
    assert fb["compression"] == pytest.approx(bsq_run["compression"], rel=0.01)
    assert abs(fb["hard_cost_rel_error"]) <= 0.01 and fb["achieved_cost"] == pytest.approx(fb["size_mb"], rel=1e-6)
    assert (
        fb["labels"]["method"] == "fracbits" and fb["labels"]["alpha"] == "2" and fb["labels"]["match"] == "compression"
    )


def test_fracbits_runs_search_then_finetune_in_one_schedule(runs):
    _, out = runs
    fb, history = _metrics(out, "fracbits"), pd.read_csv(out["fracbits"]["history"])
    assert fb["search_epochs"] == 5  # int(0.8 * 6) + 1, as the official 121 of 150
    assert list(history["epoch"]) == [0, 1, 2, 3, 4, 5]
    assert history["train_penalty"].iloc[:5].notna().all() and history["train_penalty"].iloc[5:].isna().all()
    assert history["hard_offset"].notna().tolist() == [False] * 5 + [True]  # assigned at the start of epoch 5
    assert fb["best_epoch"] == 5  # only discrete models are candidates
    assert "top1_before_ft" in fb and fb["selection"].startswith("best test top-1 epoch after")
    lr = list(history["lr"])
    assert lr == sorted(lr, reverse=True) and lr[0] == pytest.approx(0.05)  # one cosine schedule, no restart


def test_hard_assigned_model_is_discrete_and_evaluates_the_same(runs):
    _, out = runs
    ckpt = load_checkpoint(out["fracbits"]["checkpoint"])
    assert ckpt["form"] == "frac" and all(bool(v) for k, v in ckpt["state_dict"].items() if k.endswith(".hard"))
    scheme = json.loads(out["fracbits"]["scheme"].read_text())
    assert scheme == ckpt["precisions"] and all(float(b) == int(b) for b in scheme.values())
    fb, ev = _metrics(out, "fracbits"), _metrics(out, "eval_fracbits")
    for key in ("top1", "compression", "size_mb", "bitops_g"):
        assert ev[key] == pytest.approx(fb[key]), key
    assert ev["act_bits"] == 4 and ev["labels"]["method"] == "fracbits"


def test_uniform_qat_has_fixed_bits_and_eight_bit_ends(runs):
    _, out = runs
    scheme = json.loads(out["uniform"]["scheme"].read_text())
    weights = {k: v for k, v in scheme.items() if not k.endswith(".act")}
    assert weights.pop("conv1") == 8 and weights.pop("fc") == 8 and set(weights.values()) == {2}
    assert {v for k, v in scheme.items() if k.endswith(".act")} == {4}
    u, ev = _metrics(out, "uniform"), _metrics(out, "eval_uniform")
    assert 2 < u["avg_bits"] < 2.5 and ev["top1"] == pytest.approx(u["top1"])
    assert ev["labels"]["method"] == "uniform" and ev["labels"]["bits"] == 2


def test_baseline_runs_are_children_of_the_float_model_in_mlflow(runs):
    root, out = runs
    frame = _runs(root).set_index("run_id")
    pretrain_run = json.loads(out["pretrain"]["run"].read_text())["run_id"]
    for name in ("fracbits", "uniform"):
        run = frame.loc[json.loads(out[name]["run"].read_text())["run_id"]]
        assert run["tags.bsq.upstream_run_id"] == pretrain_run and run["tags.bsq.stage"] == name
        assert run["tags.bsq.method"] == name and run["status"] == "FINISHED"
    evaluation = frame.loc[json.loads(out["eval_fracbits"]["run"].read_text())["run_id"]]
    assert evaluation["tags.bsq.method"] == "fracbits" and evaluation["tags.bsq.fracbits_run_id"]


def test_interrupted_fracbits_resumes_to_the_same_result(tmp_path, monkeypatch):
    """Interrupted after the first epoch: the resumed run crosses the hard assignment and ends identical."""
    cfg = {**tiny_config(tmp_path, epochs=3), "fracbits": {"target": 0.004, "search_epochs": 2}}
    base = default_outputs("pretrain", tmp_path / "pretrain")
    pretrain.run({**cfg, "optim": {"epochs": 1, "lr": 0.05}}, {}, base)
    upstream = {"checkpoint": base["checkpoint"]}
    straight = default_outputs("fracbits", tmp_path / "straight")
    fracbits.run(cfg, upstream, straight)
    resumed = default_outputs("fracbits", tmp_path / "resumed")
    with monkeypatch.context() as m:
        interrupt_after_first_epoch(m)
        with pytest.raises(KeyboardInterrupt):
            fracbits.run(cfg, upstream, resumed)
    fracbits.run(cfg, upstream, resumed)
    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    ma, mb = (json.loads(o["metrics"].read_text()) for o in (straight, resumed))
    for key in ("top1", "hard_offset", "hard_cost", "top1_before_ft", "compression"):
        assert ma[key] == mb[key], key


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fracbits": {}}, "FracBits needs a target"),
        ({"fracbits": {"target": 5.0}}, "outside what the bit ranges can reach"),
        ({"fracbits": {"target": 0.001, "search_epochs": 3}}, "leaves no finetune epoch"),
        ({"fracbits": {"target": 0.001}, "optim": {"epochs": 1}}, "FracBits needs optim.epochs >= 2"),
        ({"fracbits": {"target": 0.001, "w_bits": [0, 8]}}, "prune_channels: true"),
        ({"fracbits": {"target": 0.001, "cost": "latency"}}, "fracbits.cost must be size or bitops"),
        ({"qat": {"variant": "lsq"}}, "qat.variant must be sat or pact"),
    ],
)
def test_bad_fracbits_input_fails_before_writing(tmp_path, change, message):
    cfg = {**tiny_config(tmp_path, epochs=3), **change}
    base = default_outputs("pretrain", tmp_path / "pretrain")
    pretrain.run({**tiny_config(tmp_path), "optim": {"epochs": 1}}, {}, base)
    out = default_outputs("fracbits", tmp_path / "fb")
    with pytest.raises(BSQError, match=message):
        fracbits.run(cfg, {"checkpoint": base["checkpoint"]}, out)
    assert not (tmp_path / "fb").exists() or not any((tmp_path / "fb").iterdir())


def test_budget_and_target_together_or_unreadable_budget_are_refused(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3)
    base = default_outputs("pretrain", tmp_path / "pretrain")
    pretrain.run({**cfg, "optim": {"epochs": 1}}, {}, base)
    budget = tmp_path / "budget.json"
    budget.write_text("{not json")
    inputs = {"checkpoint": base["checkpoint"], "budget": budget}
    with pytest.raises(BSQError, match="cannot read the FracBits budget"):
        fracbits.run(cfg, inputs, default_outputs("fracbits", tmp_path / "a"))
    budget.write_text(json.dumps({"compression": 8.0}))
    with pytest.raises(BSQError, match="either fracbits.target or a budget"):
        fracbits.run({**cfg, "fracbits": {"target": 0.01}}, inputs, default_outputs("fracbits", tmp_path / "b"))


def test_fracbits_refuses_a_quantized_parent(runs, tmp_path):
    _, out = runs
    with pytest.raises(BSQError, match="needs one of \\['float'\\]"):
        fracbits.run(
            {**tiny_config(tmp_path, epochs=3), "fracbits": {"target": 0.01}},
            {"checkpoint": out["prune"]["checkpoint"]},
            default_outputs("fracbits", tmp_path / "x"),
        )


def test_frac_layers_start_at_the_target_plus_half(runs):
    _, out = runs
    fb = _metrics(out, "fracbits")
    assert fb["init_bits"] == pytest.approx(fb["uniform_equivalent_bits"] + 0.5)
    ckpt = load_checkpoint(out["fracbits"]["checkpoint"])
    assert ckpt["policy"]["w_bits"] == [0, 8] and ckpt["policy"]["a_bits"] == [4, 4]
    from bsq.checkpoint import load_model

    model = load_model(ckpt)
    assert all(bool(layer.hard) for _, layer in frac_layers(model))

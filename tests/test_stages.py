"""The five stages end to end on the embedded digits data with a tiny ResNet-8: outputs, MLflow runs and their
lineage, exact resume after an interruption, and bad input that fails before anything is written."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bsq import engine
from bsq.checkpoint import load_checkpoint, load_model
from bsq.errors import BSQError
from bsq.methods.bsq import finetune, prune, search
from bsq.stages import default_outputs, evaluate, pretrain
from tests.helpers import interrupt_after_first_epoch, tiny_config
from tests.helpers import mlflow_runs as _runs

# label -> bsq.alpha. "1e-1" is labelled through the config's `labels` (as the workflow spells it), "5" by the
# search itself (the shortest spelling of 5.0).
ALPHAS = {"1e-1": 0.1, "5": 5.0}
LABELLED = ("1e-1",)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """pretrain -> search (2 alphas) -> prune -> finetune -> evaluate, once for the module."""
    root = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_config(root)
    out = {"pretrain": default_outputs("pretrain", root / "pretrain")}
    pretrain.run({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out["pretrain"])
    for alpha in ALPHAS:
        d = root / f"alpha-{alpha}"
        for stage in ("search", "prune", "finetune", "evaluate"):
            out[(stage, alpha)] = default_outputs(stage, d / stage)
        labels = {"labels": {"alpha": alpha}} if alpha in LABELLED else {}
        search.run(
            {**cfg, "bsq": {**cfg["bsq"], "alpha": ALPHAS[alpha]}, **labels},
            {"checkpoint": out["pretrain"]["checkpoint"]},
            out[("search", alpha)],
        )
        prune.run(cfg, {"checkpoint": out[("search", alpha)]["checkpoint"]}, out[("prune", alpha)])
        finetune.run(
            {**cfg, "optim": {"epochs": 1, "lr": 0.01}},
            {"checkpoint": out[("prune", alpha)]["checkpoint"]},
            out[("finetune", alpha)],
        )
        evaluate.run(cfg, {"checkpoint": out[("finetune", alpha)]["checkpoint"]}, out[("evaluate", alpha)])
    return root, out


def test_every_declared_output_exists(pipeline):
    _, out = pipeline
    for paths in out.values():
        for path in paths.values():
            assert path.is_file(), path
    assert not list(pipeline[0].rglob(".*.resume.pt")), "resume files are removed once a stage finishes"


def test_scheme_matches_the_pruned_model_and_metrics(pipeline):
    _, out = pipeline
    for alpha in ALPHAS:
        scheme = json.loads(out[("prune", alpha)]["scheme"].read_text())
        ckpt = load_checkpoint(out[("prune", alpha)]["checkpoint"])
        assert ckpt["form"] == "bits" and ckpt["labels"]["alpha"] == alpha
        model = load_model(ckpt)
        from bsq.quant.convert import export_scheme

        assert export_scheme(model) == scheme
        assert all(0 <= b <= 8 for b in scheme.values()) and "fc.bias" in scheme
        metrics = json.loads(out[("prune", alpha)]["metrics"].read_text())
        params = {r["layer"]: r["params"] for r in _layers(out[("prune", alpha)]["layers"])}
        tp = sum(params.values())
        assert metrics["avg_bits"] == pytest.approx(sum(params[k] * scheme[k] for k in params) / tp)


def _layers(path):
    import csv

    with open(path) as f:
        return [{**r, "params": int(r["params"])} for r in csv.DictReader(f)]


def test_finetune_keeps_the_scheme_and_float_form_is_exact(pipeline):
    _, out = pipeline
    for alpha in ALPHAS:
        scheme = json.loads(out[("prune", alpha)]["scheme"].read_text())
        bits = load_model(load_checkpoint(out[("finetune", alpha)]["checkpoint"]))
        from bsq.quant.convert import export_scheme

        tuned = export_scheme(bits)
        assert all(tuned[k] <= scheme[k] for k in scheme)  # precisions fixed; a layer may only become all-zero
        flt = load_checkpoint(out[("finetune", alpha)]["float_checkpoint"])
        assert flt["form"] == "float"
        float_model = load_model(flt)
        x = torch.randn(5, 1, 8, 8)
        bits.eval(), float_model.eval()
        assert torch.equal(bits(x), float_model(x))


def test_train_from_scratch_applies_the_scheme_exactly(pipeline, tmp_path):
    """The Table 1 baseline: float model + scheme -> same precisions, 0-bit layers included, and the run says so."""
    root, out = pipeline
    scheme = json.loads(out[("prune", LABELLED[0])]["scheme"].read_text())
    scheme["layer1.0.conv1"] = 0  # a layer BSQ removed must stay removed, not come back at 1 bit
    scheme_path = tmp_path / "scheme.json"
    scheme_path.write_text(json.dumps(scheme))
    cfg = tiny_config(tmp_path)  # its own MLflow store: the module's store is counted by the lineage test
    cfg = {**cfg, "optim": {"epochs": 1, "lr": 0.01}, "labels": {"variant": "scratch", "alpha": LABELLED[0]}}
    outputs = default_outputs("finetune", tmp_path / "scratch")
    metrics = finetune.run(cfg, {"checkpoint": out["pretrain"]["checkpoint"], "scheme": scheme_path}, outputs)
    from bsq.quant.convert import export_scheme

    tuned = export_scheme(load_model(load_checkpoint(outputs["checkpoint"])))
    assert tuned["layer1.0.conv1"] == 0
    assert all(tuned[k] <= scheme[k] for k in scheme)
    params = {k: v for k, v in _layer_params(outputs).items()}
    expected = sum(params[k] * tuned[k] for k in params) / sum(params.values())
    assert metrics["avg_bits"] == pytest.approx(expected)
    assert metrics["labels"]["variant"] == "scratch" and metrics["labels"]["alpha"] == LABELLED[0]


def _layer_params(outputs) -> dict[str, int]:
    from bsq.quant.convert import bit_layers

    model = load_model(load_checkpoint(outputs["checkpoint"]))
    counts = {}
    for name, layer in bit_layers(model):
        for what in layer.quantized_tensors():
            counts[name if what == "weight" else f"{name}.{what}"] = layer.num_params(what)
    return counts


def test_evaluate_agrees_with_finetune(pipeline):
    _, out = pipeline
    for alpha in ALPHAS:
        tuned = json.loads(out[("finetune", alpha)]["metrics"].read_text())
        ev = json.loads(out[("evaluate", alpha)]["metrics"].read_text())
        assert ev["top1"] == pytest.approx(tuned["top1"])
        for key in ("avg_bits", "compression", "bitops_g", "size_mb"):
            assert ev[key] == pytest.approx(tuned[key])
        assert ev["labels"] == {**ev["labels"], "alpha": alpha, "dataset": "digits", "arch": "resnet8", "seed": 3}


def test_mlflow_runs_and_lineage(pipeline):
    root, out = pipeline
    runs = _runs(root)
    assert len(runs) == 1 + 4 * len(ALPHAS)
    assert set(runs["status"]) == {"FINISHED"}
    by_id = runs.set_index("run_id")
    run_ids = {key: json.loads(paths["run"].read_text())["run_id"] for key, paths in out.items()}
    for alpha in ALPHAS:
        chain = [run_ids["pretrain"]] + [run_ids[(s, alpha)] for s in ("search", "prune", "finetune", "evaluate")]
        for parent, child in zip(chain, chain[1:], strict=False):  # lineage in tags; no parent chain (one level)
            assert by_id.loc[child, "tags.bsq.upstream_run_id"] == parent
            assert "tags.mlflow.parentRunId" not in by_id or by_id.loc[child, "tags.mlflow.parentRunId"] != parent
        ft = by_id.loc[run_ids[("finetune", alpha)]]
        assert ft["tags.bsq.pretrain_run_id"] == run_ids["pretrain"]
        assert ft["tags.bsq.search_run_id"] == run_ids[("search", alpha)]
        assert ft["tags.mlflow.runName"] == f"bsq α={alpha} · finetune · s3"
        assert ft["tags.bsq.alpha"] == alpha and ft["tags.bsq.stage"] == "finetune"
        assert by_id.loc[run_ids[("search", alpha)], "params.bsq.alpha"] == str(ALPHAS[alpha])
        assert len(by_id.loc[run_ids[("search", alpha)], "tags.bsq.config_hash"]) == 12


def test_search_logs_per_epoch_metrics_and_bits(pipeline):
    from mlflow import MlflowClient

    root, out = pipeline
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run_id = json.loads(out[("search", LABELLED[0])]["run"].read_text())["run_id"]
    for key in ("test_top1", "train_penalty", "bit_sparsity", "bits/conv1", "requant_top1_after"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key

    hist = pd.read_csv(out[("search", LABELLED[0])]["history"])
    assert list(hist["epoch"]) == [0, 1] and "bits/layer1.0.conv1" in hist.columns
    assert hist["lr"].tolist() == pytest.approx([0.05, 0.005])  # milestone at epoch 1


def test_larger_alpha_gives_fewer_bits(pipeline):
    _, out = pipeline
    bits = [json.loads(out[("prune", a)]["metrics"].read_text())["avg_bits"] for a in ALPHAS]  # 0.1, then 5
    assert bits[1] < bits[0] <= 8


# ---- resume ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["search", "finetune"])
def test_interrupted_stage_resumes_to_the_same_result(tmp_path, monkeypatch, stage):
    cfg = tiny_config(tmp_path, epochs=3, milestones=[2])
    cfg["bsq"] = {"alpha": 1e-2, "requant_interval": 2}
    base = default_outputs("pretrain", tmp_path / "pretrain")
    pretrain.run({**cfg, "optim": {"epochs": 1, "lr": 0.05}}, {}, base)
    upstream = {"checkpoint": base["checkpoint"]}
    if stage == "finetune":
        s_out = default_outputs("search", tmp_path / "search")
        search.run({**cfg, "optim": {"epochs": 1}}, upstream, s_out)
        p_out = default_outputs("prune", tmp_path / "prune")
        prune.run(cfg, {"checkpoint": s_out["checkpoint"]}, p_out)
        upstream = {"checkpoint": p_out["checkpoint"]}
    module = {"search": search, "finetune": finetune}[stage]

    straight = default_outputs(stage, tmp_path / "straight")
    module.run(cfg, upstream, straight)

    resumed = default_outputs(stage, tmp_path / "resumed")
    with monkeypatch.context() as m:
        interrupt_after_first_epoch(m)
        with pytest.raises(KeyboardInterrupt):
            module.run(cfg, upstream, resumed)
    assert (tmp_path / "resumed" / f".{stage}.resume.pt").is_file()
    assert not resumed["metrics"].exists()
    module.run(cfg, upstream, resumed)

    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert a["precisions"] == b["precisions"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    ma, mb = json.loads(straight["metrics"].read_text()), json.loads(resumed["metrics"].read_text())
    for key, value in ma.items():
        if isinstance(value, float) and not key.endswith("_seconds"):
            assert mb[key] == value, key
    timing = lambda df: df.drop(columns=[c for c in df.columns if c.endswith("_seconds")])  # noqa: E731
    pd.testing.assert_frame_equal(timing(pd.read_csv(straight["history"])), timing(pd.read_csv(resumed["history"])))

    runs = _runs(tmp_path)
    run_id = json.loads(resumed["run"].read_text())["run_id"]
    row = runs.set_index("run_id").loc[run_id]
    assert row["status"] == "FINISHED"  # the interrupted run was reopened, not duplicated
    assert (runs["tags.mlflow.runName"] == row["tags.mlflow.runName"]).sum() == 2  # straight + resumed


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    cfg = tiny_config(root, epochs=1)
    cfg["tracking"] = {"enabled": False}
    out = default_outputs("pretrain", root)
    pretrain.run(cfg, {}, out)
    return out["checkpoint"]


def _sentinels(out):
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep me")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bsq": {"alpha": 0}}, "bsq.alpha must be a number > 0"),
        ({"bsq": {"alpha": "-1e-3"}}, "bsq.alpha must be a number > 0"),
        ({"optim": {"lrr": 0.1}}, "unknown key(s) optim.lrr"),
        ({"optimizer": {}}, "unknown key(s) optimizer"),
        ({"data": {"name": "cifar10", "root": "/nonexistent/cifar"}}, "but data.name='cifar10' has 10 / 3"),
        ({"model": {"arch": "resnet20"}}, "holds a resnet8 but model.arch is 'resnet20'"),
        ({"model": {"arch": "resnet99"}}, "unknown model 'resnet99'"),
    ],
)
def test_bad_search_input_fails_before_writing(tmp_path, float_checkpoint, change, message):
    cfg = tiny_config(tmp_path)
    for section, values in change.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) and values else values
    out = default_outputs("search", tmp_path / "search")
    _sentinels(out)
    with pytest.raises(BSQError) as err:
        search.run(cfg, {"checkpoint": float_checkpoint}, out)
    assert message in str(err.value)
    assert all(p.read_text() == "keep me" for p in out.values())
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_dataset_dir_fails_before_writing(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["data"] = {"name": "cifar10", "root": str(tmp_path / "no-cifar")}
    cfg["model"] = {"arch": "resnet8", "width": 4}
    out = default_outputs("pretrain", tmp_path / "pretrain")
    _sentinels(out)
    with pytest.raises(BSQError, match="CIFAR-10 not found"):
        pretrain.run(cfg, {}, out)
    assert all(p.read_text() == "keep me" for p in out.values())
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("content, message", [(b"not a checkpoint", "cannot read checkpoint"), (None, "not found")])
def test_bad_checkpoint_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    out = default_outputs("search", tmp_path / "search")
    with pytest.raises(BSQError, match=message):
        search.run(tiny_config(tmp_path), {"checkpoint": path}, out)
    assert not any(p.exists() for p in out.values())


def test_truncated_checkpoint_is_reported(tmp_path, float_checkpoint):
    path = tmp_path / "cut.pt"
    path.write_bytes(float_checkpoint.read_bytes()[:2000])
    with pytest.raises(BSQError, match="corrupt or incomplete"):
        prune.run(tiny_config(tmp_path), {"checkpoint": path}, default_outputs("prune", tmp_path / "p"))


def test_stage_refuses_a_checkpoint_of_the_wrong_form(tmp_path, float_checkpoint):
    with pytest.raises(BSQError, match="needs one of \\['bits'\\]"):
        prune.run(tiny_config(tmp_path), {"checkpoint": float_checkpoint}, default_outputs("prune", tmp_path / "p"))


def test_nan_loss_stops_with_a_clear_error(tmp_path, float_checkpoint):
    cfg = tiny_config(tmp_path, lr=1e30)
    cfg["tracking"] = {"enabled": False}
    cfg["bsq"] = {"alpha": 1e30}
    with pytest.raises(engine.NonFiniteLoss, match="diverged"):
        search.run(cfg, {"checkpoint": float_checkpoint}, default_outputs("search", tmp_path / "s"))


def test_device_resident_data_trains_to_the_same_quantized_weights(pipeline, tmp_path):
    """data.on_device changes where batches are made, not what the search learns: identical bit planes."""
    _, out = pipeline
    states = []
    for on_device in (False, True):
        cfg = tiny_config(tmp_path)
        cfg = {**cfg, "data": {**cfg["data"], "on_device": on_device}, "bsq": {"alpha": 0.1, "requant_interval": 1}}
        cfg["tracking"] = {"enabled": False}
        outputs = default_outputs("search", tmp_path / f"resident-{on_device}")
        search.run(cfg, {"checkpoint": out["pretrain"]["checkpoint"]}, outputs)
        states.append(load_checkpoint(outputs["checkpoint"])["state_dict"])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key

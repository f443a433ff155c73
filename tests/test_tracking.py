"""MLflow tracking: flattened params, run lifecycle, resume, no lost writes with concurrent processes; and the runs
as users see them: self-explaining unique names, params scoped to the stage, a description with the upstream runs,
the dataset input, the model artifact, one parent run per workflow invocation with every job a direct child."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from bsq.errors import BSQError
from bsq.tracking import PARENT_ENV, Tracker, config_hash, end_invocation_run, flatten_params, start_invocation_run


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def test_flatten_params_hand_written():
    flat = flatten_params({"optim": {"lr": 0.1, "milestones": [150, 250]}, "seed": 1, "root": None, "tags": {}})
    assert flat == {"optim.lr": "0.1", "optim.milestones": "[150, 250]", "seed": "1", "root": "None", "tags": "{}"}
    assert len(flatten_params({"x": "a" * 10_000})["x"]) == 6000


def test_config_hash_ignores_key_order_and_sees_values():
    a = config_hash({"a": 1, "b": {"c": 2, "d": 3}})
    assert a == config_hash({"b": {"d": 3, "c": 2}, "a": 1}) and len(a) == 12
    assert a != config_hash({"a": 1, "b": {"c": 2, "d": 4}})


def test_run_records_params_metrics_tags_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    artifact = tmp_path / "scheme.json"
    artifact.write_text('{"conv1": 3}')
    parent = start_invocation_run("exp", {"name": "exp", "alphas": ["5e-3"]}, uri=uri)
    with Tracker(
        "exp",
        "search/alpha=5e-3/seed=1",
        uri=uri,
        tags={"bsq.stage": "search"},
        params={"optim": {"lr": 0.1}},
        parent_run_id=parent,
    ) as t:
        for step in range(3):
            t.log_metrics({"test_top1": 10.0 * step, "bits/layer1.0.conv1": 8 - step}, step=step)
        t.log_artifact(artifact)
    run = _client(uri).get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "search/alpha=5e-3/seed=1"
    assert run.data.params == {"optim.lr": "0.1"}
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["bsq.stage"] == "search"
    history = _client(uri).get_metric_history(t.run_id, "bits/layer1.0.conv1")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 8), (1, 7), (2, 6)]
    assert list((tmp_path / "artifacts" / "exp").rglob("scheme.json")), "artifacts live beside the local store"


def test_a_parent_from_another_store_or_experiment_is_dropped(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    other = Tracker("other", "r", uri=uri)
    with (
        Tracker("exp", "child", uri=uri, parent_run_id="0" * 32) as a,
        Tracker("exp", "child2", uri=uri, parent_run_id=other.run_id) as b,
    ):
        pass
    assert "mlflow.parentRunId" not in _client(uri).get_run(a.run_id).data.tags
    assert "mlflow.parentRunId" not in _client(uri).get_run(b.run_id).data.tags


def test_invocation_run_starts_and_ends(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = {"name": "default", "dataset": "digits", "alphas": ["1"], "seeds": [1]}
    run_id = start_invocation_run("default", config, uri=uri, description="one invocation")
    run = _client(uri).get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == f"default · {config_hash(config)[:7]}"
    assert run.data.tags["mlflow.note.content"] == "one invocation" and run.data.params["dataset"] == "digits"
    assert _client(uri).get_experiment(run.info.experiment_id).name == "default"
    end_invocation_run(run_id, "FAILED", uri=uri)
    assert _client(uri).get_run(run_id).info.status == "FAILED"
    end_invocation_run(None, uri=uri)  # no invocation run (mlflow off, dry run): nothing to do


def test_run_names_say_what_each_run_is():
    from bsq.stages.lineage import run_name, run_point

    bsq3 = {"method": "bsq", "alpha": "3"}
    scratch = {**bsq3, "variant": "scratch"}
    frac = {
        "method": "fracbits",
        "alpha": "3",
        "budget_of": "bsq",
        "match": "compression",
        "cost": "size",
        "target": "0.0037",
    }
    target = {"method": "fracbits", "target": "0.08", "cost": "size"}
    uniform = {"method": "uniform", "bits": "4"}
    names = {
        run_name("pretrain", {"method": "bsq"}, 1): "float · pretrain · s1",
        run_name("search", bsq3, 1): "bsq α=3 · search · s1",
        run_name("prune", bsq3, 1): "bsq α=3 · prune · s1",
        run_name("finetune", bsq3, 1): "bsq α=3 · finetune · s1",
        run_name("finetune", scratch, 1): "bsq α=3 · scratch · s1",
        run_name("fracbits", frac, 1): "fracbits @ bsq α=3 size · s1",
        run_name("fracbits", target, 2): "fracbits 0.08 MB · s2",
        run_name("uniform", uniform, 1): "uniform W4 · s1",
        run_name("evaluate", scratch, 1, {"stage": "finetune", "labels": scratch}): "eval · bsq α=3 · scratch · s1",
        run_name("evaluate", {"method": "bsq"}, 1, {"stage": "pretrain", "labels": {"method": "bsq"}}): (
            "eval · float · pretrain · s1"
        ),
        run_name("evaluate", {"method": "bsq", "source": "official", "arch": "resnet20"}, 1): (
            "eval · official resnet20 · s1"
        ),
    }
    assert list(names) == list(names.values())
    assert run_point("fracbits", frac) == "bsq alpha=3 compression" and run_point("uniform", uniform) == "bits=4"
    assert run_point("pretrain", {"method": "bsq"}) == "float" and run_point("search", bsq3) == "alpha=3"


def test_params_are_the_stages_own_settings():
    from bsq.config import config_to_dict, load_stage_config
    from bsq.stages.context import scoped_params
    from bsq.tracking import flatten

    flat = flatten(config_to_dict(load_stage_config("search", {"optim": {"epochs": 1}})))
    search = scoped_params("search", flat)
    assert "bsq.alpha" in search and "quant.nbits" in search and "optim.lr" in search and "preset" in search
    assert not [k for k in search if k.split(".")[0] in ("fracbits", "qat", "finetune", "tracking", "labels")]
    assert "method" not in search  # the resolved method is logged instead (lineage._params)
    prune = scoped_params("prune", flat)
    assert "bsq.alpha" not in prune and {"bsq.overflow", "quant.maxbit"} <= set(prune)
    assert not [k for k in scoped_params("finetune", flat) if k.startswith("bsq.")]
    assert {k.split(".")[0] for k in scoped_params("fracbits", flat)} >= {"fracbits", "qat"}
    assert not [k for k in scoped_params("uniform", flat) if k.startswith(("fracbits.", "bsq."))]
    assert not [k for k in scoped_params("evaluate", flat) if k.split(".")[0] in ("bsq", "fracbits", "qat")]


def test_exception_marks_the_run_failed_and_propagates(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError, match="boom"), Tracker("exp", "r", uri=uri) as t:
        raise RuntimeError("boom")
    assert _client(uri).get_run(t.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), Tracker("exp", "r2", uri=uri) as k:
        raise KeyboardInterrupt
    assert _client(uri).get_run(k.run_id).info.status == "KILLED"


def test_resume_reopens_the_run_and_checks_params(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(KeyboardInterrupt), Tracker("exp", "r", uri=uri, params={"lr": 0.1}) as t:
        t.log_metrics({"loss": 1.0}, step=0)
        raise KeyboardInterrupt
    with Tracker("exp", "r", uri=uri, params={"lr": 0.1}, resume_run_id=t.run_id) as again:
        again.log_metrics({"loss": 0.5}, step=1)
    assert again.run_id == t.run_id
    assert [m.step for m in _client(uri).get_metric_history(t.run_id, "loss")] == [0, 1]
    assert _client(uri).get_run(t.run_id).info.status == "FINISHED"
    with pytest.raises(BSQError, match="already has param lr"):
        Tracker("exp", "r", uri=uri, params={"lr": 0.2}, resume_run_id=t.run_id)
    with pytest.raises(BSQError, match="cannot resume MLflow run"):
        Tracker("exp", "r", uri=uri, resume_run_id="0" * 32)


def test_a_resumed_run_stays_the_child_of_the_invocation_that_started_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first, second = (start_invocation_run("exp", {"name": "exp", "try": i}, uri=uri) for i in (1, 2))
    with pytest.raises(KeyboardInterrupt), Tracker("exp", "r", uri=uri, parent_run_id=first) as t:
        raise KeyboardInterrupt
    with Tracker("exp", "r", uri=uri, parent_run_id=second, resume_run_id=t.run_id):
        pass
    tags = _client(uri).get_run(t.run_id).data.tags
    assert tags["mlflow.parentRunId"] == first and tags["bsq.resumed_in_run_id"] == second


def test_disabled_tracker_does_nothing(tmp_path):
    with Tracker("exp", "r", uri=f"sqlite:///{tmp_path}/db/mlflow.db", enabled=False) as t:
        t.log_metrics({"a": 1.0}, step=0)
        t.set_tags({"x": "y"})
        t.log_artifact(tmp_path / "missing")
    assert t.run_id is None and not (tmp_path / "db").exists()


def test_unusable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BSQError, match="cannot open the MLflow store"):
        Tracker("exp", "r", uri=f"sqlite:///{blocker}/sub/mlflow.db")


WRITER = textwrap.dedent(
    """
    import sys, time
    from bsq.tracking import Tracker
    uri, index, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:  # every process hits the fresh store at the same moment
        time.sleep(0.005)
    with Tracker("concurrent", f"writer-{index}", uri=uri, params={"index": index, "cfg": {"lr": 0.1}}) as t:
        for step in range(30):
            t.log_metrics({"a": step, "b": 2 * step, "c": index}, step=step)
        t.set_tags({"done": "yes"})
    """
)


@pytest.mark.slow
def test_concurrent_processes_lose_nothing(tmp_path):
    """6 processes create the same fresh SQLite store at once and each log 30 steps of 3 metrics, one call per step."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    start = time.time() + 8  # leaves time for every interpreter to import mlflow first
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, uri, str(i), str(start)], stderr=subprocess.PIPE, text=True)
        for i in range(6)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    client = _client(uri)
    exp = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == 6
    assert {r.info.status for r in runs} == {"FINISHED"} and {r.data.tags["done"] for r in runs} == {"yes"}
    assert sorted(r.data.params["index"] for r in runs) == [str(i) for i in range(6)]
    for run in runs:
        for key in ("a", "b", "c"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(30))


def test_stage_runs_are_children_of_the_invocation_with_scoped_params_and_inputs(tmp_path, monkeypatch):
    """pretrain -> search -> prune of a tiny config under one invocation run, as the workflow runs them."""
    from bsq.methods.bsq import prune, search
    from bsq.stages import default_outputs, pretrain
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, epochs=1)
    uri = cfg["tracking"]["uri"]
    parent = start_invocation_run("test-stages", {"name": "test-stages"}, uri=uri)
    monkeypatch.setenv(PARENT_ENV, parent)
    out = {s: default_outputs(s, tmp_path / s) for s in ("pretrain", "search", "prune")}
    pretrain.run({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out["pretrain"])
    search.run(
        {**cfg, "labels": {"alpha": "3"}, "bsq": {"alpha": 3.0, "requant_interval": 1}},
        {"checkpoint": out["pretrain"]["checkpoint"]},
        out["search"],
    )
    prune.run(cfg, {"checkpoint": out["search"]["checkpoint"]}, out["prune"])
    end_invocation_run(parent, uri=uri)
    client = _client(uri)
    exp = client.get_experiment_by_name("test-stages").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp], max_results=100)}
    assert set(runs) == {
        f"test-stages · {config_hash({'name': 'test-stages'})[:7]}",
        "float · pretrain · s3",
        "bsq α=3 · search · s3",
        "bsq α=3 · prune · s3",
    }
    jobs = [r for name, r in runs.items() if r.info.run_id != parent]
    assert {r.data.tags.get("mlflow.parentRunId") for r in jobs} == {parent}  # one level: no chain
    s, p = runs["bsq α=3 · search · s3"], runs["bsq α=3 · prune · s3"]
    assert s.data.params["method"] == "bsq" and s.data.params["point"] == "alpha=3" and s.data.params["seed"] == "3"
    assert s.data.params["bsq.alpha"] == "3.0" and s.data.params["preset"] == "default"
    assert not [k for k in s.data.params if k.split(".")[0] in ("fracbits", "qat", "finetune", "labels")]
    assert "bsq.alpha" not in p.data.params and "optim.lr" not in p.data.params
    assert not [k for r in jobs for k, v in r.data.tags.items() if v == "None"]
    assert (
        p.data.tags["bsq.upstream_run_id"] == s.info.run_id and p.data.tags["bsq.upstream_run_name"] == s.info.run_name
    )
    note = p.data.tags["mlflow.note.content"]
    for upstream in (runs["float · pretrain · s3"], s):
        assert upstream.info.run_name in note and upstream.info.run_id in note
    assert f"#/experiments/{exp}/runs/{s.info.run_id}" in note
    for run, context in ((s, "train"), (p, "test")):
        (given,) = run.inputs.dataset_inputs
        assert (
            given.dataset.name == "digits" and given.dataset.source_type == "local" and len(given.dataset.digest) == 12
        )
        assert (
            "digits.csv.gz" in given.dataset.source
            and {"mlflow.data.context": context}.items() <= {t.key: t.value for t in given.tags}.items()
        )
    assert {f.path for f in client.list_artifacts(s.info.run_id, "model")} == {"model/model.pt"}
    assert client.get_run(parent).info.status == "FINISHED"

"""MLflow tracking: flattened params, run lifecycle, resume, and no lost writes with concurrent processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from bsq.errors import BSQError
from bsq.tracking import Tracker, config_hash, flatten_params


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
    with Tracker(
        "exp",
        "search/alpha=5e-3/seed=1",
        uri=uri,
        tags={"bsq.stage": "search"},
        params={"optim": {"lr": 0.1}},
        parent_run_id="abc",
    ) as t:
        for step in range(3):
            t.log_metrics({"test_top1": 10.0 * step, "bits/layer1.0.conv1": 8 - step}, step=step)
        t.log_artifact(artifact)
    run = _client(uri).get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "search/alpha=5e-3/seed=1"
    assert run.data.params == {"optim.lr": "0.1"}
    assert run.data.tags["mlflow.parentRunId"] == "abc" and run.data.tags["bsq.stage"] == "search"
    history = _client(uri).get_metric_history(t.run_id, "bits/layer1.0.conv1")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 8), (1, 7), (2, 6)]
    assert list((tmp_path / "artifacts" / "exp").rglob("scheme.json")), "artifacts live beside the local store"


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

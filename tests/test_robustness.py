"""Reproducible to the bit, and robust under a cluster's signals, a second process and bad stage inputs.

Each test here failed on the code before issue 14's fixes: unseeded model initialisation, SIGTERM leaving MLflow
runs RUNNING, two processes training into one folder, and wrong inputs that produced numbers with exit code 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bsq import cli, engine
from bsq.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from bsq.errors import BSQError, StageInterrupted
from bsq.methods.bsq import finetune, prune, search
from bsq.methods.bsq.search import DegenerateScheme
from bsq.methods.fracbits import train as fracbits
from bsq.models import create_model
from bsq.runlock import LOCK_NAME, FolderBusy, FolderLock
from bsq.stages import default_outputs, pretrain
from bsq.tracking import Tracker
from tests.helpers import mlflow_runs, tiny_config, untracked_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A float model, one search on it and its pruned model (no MLflow), shared by the input checks."""
    root = tmp_path_factory.mktemp("chain")
    cfg = untracked_config(root, epochs=1)
    out = {stage: default_outputs(stage, root / stage) for stage in ("pretrain", "search", "prune")}
    pretrain.run({**cfg, "model": {**cfg["model"], "act_bits": None}}, {}, out["pretrain"])
    search.run({**cfg, "bsq": {"alpha": 0.1}}, {"checkpoint": out["pretrain"]["checkpoint"]}, out["search"])
    prune.run(cfg, {"checkpoint": out["search"]["checkpoint"]}, out["prune"])
    return out


# ---- 1. the seed fixes everything ---------------------------------------------------------------------------------
def test_same_seed_gives_bit_identical_pretrain_outputs(tmp_path):
    """Model initialisation draws from the run's seed: two runs write byte-identical model.pt and metrics.json
    (without MLflow, whose run ids the checkpoint records), and another seed starts from other weights."""
    hashes = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = default_outputs("pretrain", tmp_path / name)
        torch.manual_seed(1000 + len(hashes))  # whatever the caller's RNG state, the run must not depend on it
        pretrain.run({**untracked_config(tmp_path, epochs=1), "seed": seed}, {}, out)
        hashes.append((_sha(out["checkpoint"]), _sha(out["metrics"])))
    assert hashes[0] == hashes[1]
    assert hashes[0][0] != hashes[2][0]


# ---- 2. signals, the folder lock and runs left RUNNING ------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_ends_the_cli_like_ctrl_c(monkeypatch, signum):
    """SIGTERM / SIGHUP (scancel, SLURM's time limit) raise StageInterrupted in the job: exit code 128 + signal."""

    def stage(args):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the signal did not interrupt the stage")

    monkeypatch.setattr(cli, "_run_stage", stage)  # build_parser binds the stage function when main() calls it
    before = signal.getsignal(signum)
    assert cli.main(["pretrain", "--out-dir", "unused"]) == 128 + signum
    assert signal.getsignal(signum) == before  # the handlers are the caller's again


def test_interrupted_run_is_killed_and_its_folder_lock_released(tmp_path, monkeypatch):
    """StageInterrupted (a signal) inside training: MLflow status KILLED with the reason, resume file kept, folder
    free for the next process."""
    cfg = tiny_config(tmp_path, epochs=3)
    out = default_outputs("pretrain", tmp_path / "p")
    real = engine.train_one_epoch
    calls = {"n": 0}

    def stopped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise StageInterrupted(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", stopped)
    with pytest.raises(StageInterrupted):
        pretrain.run(cfg, {}, out)
    runs = mlflow_runs(tmp_path)
    assert list(runs["status"]) == ["KILLED"]
    assert "StageInterrupted: stopped by SIGTERM" in runs["tags.bsq.failure"].iloc[0]
    assert (tmp_path / "p" / ".pretrain.resume.pt").is_file()
    assert not (tmp_path / "p" / LOCK_NAME).exists()


def test_a_second_process_cannot_work_in_a_held_folder(tmp_path):
    folder = tmp_path / "p"
    out = default_outputs("pretrain", folder)
    busy = pytest.raises(FolderBusy, match=f"pid {os.getpid()} on .* \\(stage pretrain")
    with FolderLock(folder, "pretrain"), busy:
        pretrain.run(untracked_config(tmp_path, epochs=1), {}, out)
    assert not out["metrics"].exists()
    assert not (tmp_path / "mlflow.db").exists()
    pretrain.run(untracked_config(tmp_path, epochs=1), {}, out)  # free again once the holder let go
    assert out["metrics"].is_file()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _running_run(tmp_path: Path) -> str:
    tracker = Tracker("test-stages", "orphan", uri=f"sqlite:///{tmp_path}/mlflow.db")
    return tracker.run_id  # never finished: what a kill -9 leaves behind


def test_a_run_left_running_by_a_dead_holder_is_closed_as_killed(tmp_path):
    """kill -9 leaves the lock record (pid, run id) without its flock: the next process takes the folder and
    closes the orphan's MLflow run as KILLED."""
    orphan = _running_run(tmp_path)
    folder = tmp_path / "p"
    folder.mkdir()
    record = {"pid": _dead_pid(), "host": "h", "stage": "pretrain", "started": "t", "run_id": orphan}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    pretrain.run(tiny_config(tmp_path, epochs=1), {}, default_outputs("pretrain", folder))
    runs = mlflow_runs(tmp_path).set_index("run_id")
    assert runs.loc[orphan, "status"] == "KILLED"
    assert "taken over" in runs.loc[orphan, "tags.bsq.failure"]
    assert (runs["status"] == "FINISHED").sum() == 1
    assert not (folder / LOCK_NAME).exists()


def test_a_resume_file_of_another_config_closes_its_run(tmp_path):
    """The resume file moved aside as stale names a run that will never continue: it is closed as KILLED."""
    orphan = _running_run(tmp_path)
    folder = tmp_path / "p"
    model = create_model("resnet8", num_classes=10, in_channels=1, width=4, act_bits=4)
    args = {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "width": 4, "act_bits": 4}
    stale = make_checkpoint(model, stage="pretrain", model_args=args, policy=None, config_hash="0" * 12, run_id=orphan)
    save_checkpoint(folder / ".pretrain.resume.pt", stale)
    pretrain.run(tiny_config(tmp_path, epochs=1), {}, default_outputs("pretrain", folder))
    assert mlflow_runs(tmp_path).set_index("run_id").loc[orphan, "status"] == "KILLED"
    assert (folder / f".pretrain.resume.{'0' * 12}.stale.pt").is_file()  # kept, never deleted


@pytest.mark.slow
def test_sigterm_kills_the_run_and_the_resumed_job_ends_bit_identical(tmp_path):
    """The real thing: `bsq pretrain` in its own process gets SIGTERM mid-training, exits 143 with its MLflow run
    KILLED; the same command then resumes that run and ends with the weights of an uninterrupted run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = [sys.executable, "-m", "bsq.cli", "pretrain", "--data", "digits", "--arch", "resnet8", "--seed", "5"]
    base += ["--epochs", "40", "--set", "model.width=4", "--set", "data.train_subset=256", "--device", "cpu"]
    base += ["--tracking-uri", uri, "--experiment", "sigterm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folder = tmp_path / "stopped"
    job = subprocess.Popen([*base, "--out-dir", str(folder)], env=env, stderr=subprocess.PIPE, text=True)
    resume = folder / ".pretrain.resume.pt"
    deadline = time.monotonic() + 120
    while not resume.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert resume.exists(), "no epoch finished in time"
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    runs = mlflow_runs(tmp_path, "sigterm")
    assert list(runs["status"]) == ["KILLED"]
    assert resume.is_file() and not (folder / LOCK_NAME).exists()

    subprocess.run([*base, "--out-dir", str(folder)], env=env, check=True, capture_output=True)
    subprocess.run([*base, "--out-dir", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    runs = mlflow_runs(tmp_path, "sigterm")
    resumed = json.loads((folder / "run.json").read_text())["run_id"]
    assert runs.set_index("run_id").loc[resumed, "status"] == "FINISHED" and len(runs) == 2  # reopened, not new
    a, b = load_checkpoint(folder / "model.pt"), load_checkpoint(tmp_path / "straight" / "model.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert _sha(folder / "metrics.json") == _sha(tmp_path / "straight" / "metrics.json")


# ---- 5. wrong stage inputs fail instead of giving numbers ---------------------------------------------------------
def test_finetune_refuses_a_search_checkpoint_unless_told(tmp_path, chain):
    search_ckpt = {"checkpoint": chain["search"]["checkpoint"]}
    cfg = untracked_config(tmp_path, epochs=1)
    with pytest.raises(BSQError, match="output of the search stage, not of prune.*--allow-unpruned"):
        finetune.run(cfg, search_ckpt, default_outputs("finetune", tmp_path / "f"))
    assert not (tmp_path / "f").exists()
    metrics = finetune.run(cfg, search_ckpt, default_outputs("finetune", tmp_path / "g"), allow_unpruned=True)
    assert metrics["avg_bits"] > 0


@pytest.mark.parametrize("bits", [-3, 17])
def test_scheme_bits_out_of_range_are_refused(tmp_path, chain, bits):
    scheme = json.loads(chain["prune"]["scheme"].read_text())
    scheme[next(iter(scheme))] = bits
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps(scheme))
    inputs = {"checkpoint": chain["pretrain"]["checkpoint"], "scheme": path}
    with pytest.raises(BSQError, match="bits outside 0..16"):
        finetune.run(tiny_config(tmp_path, epochs=1), inputs, default_outputs("finetune", tmp_path / "f"))
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run


def test_unknown_scheme_layer_fails_before_any_mlflow_run(tmp_path, chain):
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps({"no.such.layer": 2}))
    inputs = {"checkpoint": chain["pretrain"]["checkpoint"], "scheme": path}
    with pytest.raises(BSQError, match="does not match this model"):
        finetune.run(tiny_config(tmp_path, epochs=1), inputs, default_outputs("finetune", tmp_path / "f"))
    assert not (tmp_path / "mlflow.db").exists()


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, chain):
    ckpt = load_checkpoint(chain["prune"]["checkpoint"])
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    path = save_checkpoint(tmp_path / "nan.pt", ckpt)
    with pytest.raises(BSQError, match=f"NaN or infinite values in 1 tensor\\(s\\) \\({name}\\).*diverged"):
        load_checkpoint(path)


def test_an_alpha_that_zeroes_every_layer_fails_with_advice(tmp_path, chain):
    cfg = {**untracked_config(tmp_path, epochs=2), "bsq": {"alpha": 1e30, "requant_interval": 1}}
    cfg["optim"]["lr"] = 0.05
    with pytest.raises(DegenerateScheme, match="every quantized layer is at 0 bits.*bsq.alpha=1e\\+30.*smaller alpha"):
        search.run(cfg, {"checkpoint": chain["pretrain"]["checkpoint"]}, default_outputs("search", tmp_path / "s"))
    assert not (tmp_path / "s" / "metrics.json").exists()


@pytest.mark.parametrize("value", ["lots", None, [1]])
def test_a_non_numeric_budget_is_a_clear_error(tmp_path, chain, value):
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"compression": value, "size_mb": value}))
    cfg = {**untracked_config(tmp_path, epochs=2)}
    inputs = {"checkpoint": chain["pretrain"]["checkpoint"], "budget": budget}
    with pytest.raises(BSQError, match="the budget.s compression must be a number > 0"):
        fracbits.run(cfg, inputs, default_outputs("fracbits", tmp_path / "fb"))


# ---- 6. smaller things -------------------------------------------------------------------------------------------
def test_out_dir_that_is_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file")
    with pytest.raises(BSQError, match="is a file, not a folder"):
        pretrain.run(untracked_config(tmp_path, epochs=1), {}, default_outputs("pretrain", blocker / "p"))
    assert blocker.read_text() == "a file"


def test_outputs_are_readable_by_the_group_and_others(tmp_path, chain):
    """Atomic writes go through mkstemp (0600); the final files get the ordinary umask mode."""
    old = os.umask(0o022)
    try:
        out = default_outputs("prune", tmp_path / "p")
        prune.run(untracked_config(tmp_path), {"checkpoint": chain["search"]["checkpoint"]}, out)
    finally:
        os.umask(old)
    for path in out.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_divergence_before_any_epoch_promises_no_resume_file(tmp_path, chain):
    cfg = {**untracked_config(tmp_path, lr=1e30), "bsq": {"alpha": 0.1}}
    with pytest.raises(engine.NonFiniteLoss) as err:
        search.run(cfg, {"checkpoint": chain["pretrain"]["checkpoint"]}, default_outputs("search", tmp_path / "s"))
    assert "No epoch completed, so there is nothing to resume from" in str(err.value)
    assert "is kept" not in str(err.value)


def test_an_unreachable_tracking_server_fails_in_seconds_before_anything_runs(tmp_path):
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = {**tiny_config(tmp_path, epochs=1), "tracking": {"uri": f"http://127.0.0.1:{port}"}}
    started = time.monotonic()
    with pytest.raises(BSQError, match=f"cannot reach the MLflow tracking server at http://127.0.0.1:{port}"):
        pretrain.run(cfg, {}, default_outputs("pretrain", tmp_path / "p"))
    assert time.monotonic() - started < 30
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_two_fresh_dag_runs_give_identical_tables(tmp_path):
    """The workflow end to end, twice in fresh folders (a reduced default: one alpha, BSQ + uniform W2, short
    schedules): byte-identical tables. Before the seeded model initialisation every fresh DAG differed."""
    from tests.workflow_helpers import _make_workdir, _snakemake

    overlay = {
        "alphas": ["1"],
        "methods": ["bsq", "uniform"],
        "uniform_bits": [2],
        "train_from_scratch": False,
        "stages": {
            "common": {"data": {"batch_size": 128, "test_batch_size": 200, "train_subset": 512}},
            "pretrain": {"optim": {"epochs": 4, "lr": 0.1, "schedule": "cosine"}},
            "search": {"optim": {"epochs": 4, "lr": 0.02}, "bsq": {"requant_interval": 2}},
            "finetune": {"optim": {"epochs": 2, "lr": 0.01}},
            "uniform": {"optim": {"epochs": 2}},
        },
    }
    tables = []
    for name in ("first", "second"):
        workdir = _make_workdir(tmp_path / name)
        (workdir / "reduced.yaml").write_text(json.dumps(overlay))
        result = _snakemake(workdir, "aggregate", "--cores", "2", "--configfile", "reduced.yaml")
        assert result.returncode == 0, result.stderr[-4000:]
        tables.append({p.name: _sha(p) for p in sorted((workdir / "results" / "tables").glob("default*.csv"))})
    assert set(tables[0]) == {"default.csv", "default_runs.csv"}
    assert tables[0] == tables[1]


def test_act_bits_none_on_the_command_line_means_float_activations():
    """`--act-bits none` used to read as "flag not given", leaving the config's 4-bit activations."""
    args = cli.build_parser().parse_args(["search", "--act-bits", "none", "--set", "model.act_bits=4"])
    assert cli.stage_config_from_args(args)["model"]["act_bits"] is None
    args = cli.build_parser().parse_args(["search", "--act-bits", "3"])
    assert cli.stage_config_from_args(args)["model"]["act_bits"] == 3


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "stage.yaml"
    bad.write_text("optim:\n  epochs: [1, 2\nseed: 1\n")
    args = cli.build_parser().parse_args(["pretrain", "--config", str(bad)])
    with pytest.raises(BSQError, match=f'in "{bad}", line 3'):
        cli.stage_config_from_args(args)

"""The Snakemake workflow: validated configs, the expected DAGs, and the default DAG run end to end whose tables and
plots hold exactly the runs' numbers."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import PROJECT_ROOT
from tests.workflow_helpers import _job_counts, _make_workdir, _snakemake

EXPERIMENTS = sorted((PROJECT_ROOT / "config" / "experiments").glob("*.yaml"))


@pytest.fixture
def workdir(tmp_path):
    return _make_workdir(tmp_path)


def _expected_counts(config: dict) -> dict[str, int]:
    """Jobs per rule: BSQ per alpha x seed (+ scratch), each budgeted method (FracBits, CSQ, ...) per matched alpha and
    target, uniform per bits."""
    seeds = len(config["seeds"])
    methods = config.get("methods", ["bsq", "fracbits", "uniform"])
    runs = len(config["alphas"]) * seeds if "bsq" in methods else 0
    variants = 2 if config.get("train_from_scratch", True) else 1

    def budgeted(method: str) -> int:  # one run per BSQ run (`<method>.match`) plus one per explicit target
        settings = config.get(method, {})
        points = (runs if settings.get("match", "compression") else 0) + len(settings.get("targets", [])) * seeds
        return points if method in methods else 0

    one_stage = {m: budgeted(m) for m in ("csq", "msq", "fracbits", "hawq", "dnas")}
    uniform = len(config.get("uniform_bits", [2, 3, 4, 8])) * seeds if "uniform" in methods else 0
    counts = {
        "pretrain": seeds,
        "evaluate_pretrain": seeds,
        "bsq_search": runs,
        "prune": runs,
        "finetune": runs,
        "train_from_scratch": runs if variants == 2 else 0,
        **one_stage,
        "uniform": uniform,
        "evaluate": runs * variants + sum(one_stage.values()) + uniform,
        "aggregate": 1,
        "inspect_model": 1,
        "all": 1,
    }
    return {rule: n for rule, n in counts.items() if n}


def test_default_dry_run_lists_every_stage_per_alpha_and_seed(workdir):
    result = _snakemake(workdir, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((PROJECT_ROOT / "config" / "config.yaml").read_text())
    assert len(config["alphas"]) >= 3 and all(isinstance(a, str) for a in config["alphas"])
    assert _job_counts(result.stdout) == _expected_counts(config)


def test_two_seeds_double_the_runs_but_not_the_aggregate(workdir):
    result = _snakemake(workdir, "-n", "--quiet", "rules", "--config", "seeds=[1,2]", "train_from_scratch=false")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((PROJECT_ROOT / "config" / "config.yaml").read_text())
    expected = _expected_counts({**config, "seeds": [1, 2], "train_from_scratch": False})
    assert _job_counts(result.stdout) == expected


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_profiles_plan_the_same_dag(workdir, profile):
    """Both profiles parse (the SLURM one through snakemake-executor-plugin-slurm) and plan the default jobs."""
    result = _snakemake(
        workdir, "-n", "--quiet", "rules", "--profile", str(PROJECT_ROOT / "workflow/profiles" / profile)
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((PROJECT_ROOT / "config" / "config.yaml").read_text())
    assert _job_counts(result.stdout) == _expected_counts(config)


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_overlays_validate_and_list_their_jobs(workdir, experiment):
    """Each paper recipe dry-runs (with stand-in data folders) and names its command and expected numbers."""
    overlay = yaml.safe_load(experiment.read_text())
    header = experiment.read_text().split("\nname:")[0]
    assert "snakemake" in header and "Expected" in header, "header must give the command and expected numbers"
    data = workdir / "data"
    (data / "train").mkdir(parents=True)
    (data / "val").mkdir()
    weights = workdir / "weights.pth"
    weights.write_bytes(b"")
    extra = [f"data_root={data}"] + ([f"pretrained={weights}"] if overlay.get("pretrained") else [])
    result = _snakemake(workdir, "-n", "--quiet", "rules", "--configfile", str(experiment), "--config", *extra)
    assert result.returncode == 0, result.stderr
    config = {**yaml.safe_load((PROJECT_ROOT / "config" / "config.yaml").read_text()), **overlay}
    assert _job_counts(result.stdout) == _expected_counts(config)


def test_paper_sweep_is_the_papers_alphas():
    overlay = yaml.safe_load((PROJECT_ROOT / "config/experiments/cifar10_resnet20.yaml").read_text())
    assert overlay["alphas"] == ["3e-3", "5e-3", "7e-3", "1e-2", "2e-2"]
    assert overlay["stages"]["search"]["bsq"]["requant_interval"] == 100


@pytest.mark.parametrize(
    "override, message",
    [
        (["seeds=one"], "'one' is not of type 'array'"),
        (["alphas=['-5e-3']"], "does not match"),  # the schema's number pattern rejects the sign
        (["alphas=['0']"], "alphas must all be > 0"),
        (["arch=resnet21"], "'resnet21' is not one of"),
        (["dataset=cifar10", "data_root=/nonexistent/cifar"], "data_root: /nonexistent/cifar does not exist"),
        (["dataset=cifar10"], "data_root is required for dataset cifar10"),
        (["colour=blue"], "unknown config key colour. Allowed keys: preset, name, dataset,"),
        (["stages={search: {optim: {lrr: 1}}}"], "unknown key(s) optim.lrr"),
        (["stages={finetune: {optim: {epochs: -1}}}"], "optim.epochs"),
        (["pretrained=/nonexistent/model.pth"], "pretrained: /nonexistent/model.pth not found"),
        (["methods=[fracbits]"], "methods has fracbits but nothing sets its targets"),
        (["methods=[bsq,lsq]"], "'lsq' is not one of"),
        (["uniform_bits=[0]"], "qat.bits must be an integer in 1..16, got 0"),
        (["stages={fracbits: {fracbits: {cost: bitops}}}"], "fracbits.match: compression needs"),
        (["stages={fracbits: {fracbits: {kappa: -1}}}"], "fracbits.kappa must be a number > 0"),
    ],
)
def test_bad_config_fails_before_any_job(workdir, override, message):
    result = _snakemake(workdir, "-n", "--config", *override)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


def test_bad_published_baselines_fail_before_any_job(workdir):
    sheet = workdir / "config" / "published_baselines.csv"
    frame = pd.read_csv(sheet)
    frame.loc[0, "status"] = "probably"
    frame.to_csv(sheet, index=False)
    result = _snakemake(workdir, "-n")
    assert result.returncode != 0 and "'probably' is not one of" in result.stderr + result.stdout


# ---- the default DAG, end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """`snakemake --cores 2` on the default config in a fresh folder (what `make run` does), timed."""
    workdir = _make_workdir(tmp_path_factory.mktemp("dag"))
    started = time.perf_counter()
    result = _snakemake(workdir, "--cores", "2")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"default DAG: {elapsed:.0f} s on --cores 2")
    return workdir, elapsed


def _eval_files(workdir: Path) -> list[Path]:
    return sorted((workdir / "results").glob("default/*/*/**/eval*/metrics.json"))


@pytest.mark.slow
def test_default_dag_runs_every_method_end_to_end(finished):
    """Every method's evaluation, the tables and the plots exist. (Its wall time is printed, not asserted: speed
    goals live in benchmarks; `benchmarks/dag_time.py` records it.)"""
    workdir, _ = finished
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    n, bits = len(config["alphas"]), len(config["uniform_bits"])
    files = _eval_files(workdir)
    assert len(files) == 1 + 2 * n + n + bits  # FP, BSQ finetune + scratch, FracBits, uniform
    methods = {json.loads(p.read_text())["labels"]["method"] for p in files}
    assert methods == {"bsq", "fracbits", "uniform"}
    for name in ("default.csv", "default.md", "default.tex", "default_runs.csv"):
        assert (workdir / "results" / "tables" / name).stat().st_size > 0
    for name in ("pareto.png", "layer_bits.png", "search_curves.png"):
        assert (workdir / "results" / "plots" / "default" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_tables_hold_the_runs_numbers(finished):
    workdir, _ = finished
    runs = pd.read_csv(workdir / "results" / "tables" / "default_runs.csv", dtype=str, keep_default_na=False)
    summary = pd.read_csv(workdir / "results" / "tables" / "default.csv", dtype=str, keep_default_na=False)
    markdown = (workdir / "results" / "tables" / "default.md").read_text()
    latex = (workdir / "results" / "tables" / "default.tex").read_text()
    for path in _eval_files(workdir):
        metrics = json.loads(path.read_text())
        row = runs[runs["source"] == str(path.relative_to(workdir))]
        assert len(row) == 1, path
        for key in ("top1", "top5", "avg_bits", "compression", "size_mb", "bitops_g"):
            assert float(row[key].iloc[0]) == pytest.approx(metrics[key]), key
        keys = ["method", "variant", "setting"]
        mean = summary.merge(row[keys], on=keys)
        assert len(mean) == 1 and float(mean["top1"].iloc[0]) == pytest.approx(metrics["top1"])
        assert mean["top1_std"].iloc[0] == ""  # one seed: no std
        assert f"{metrics['top1']:.2f}" in markdown and f"{metrics['top1']:.2f}" in latex
        job = (
            path.parent.parent / path.parent.name.removeprefix("eval-")
            if path.parent.name != "eval"
            else path.parent.parent
        )
        trained = json.loads((job / "metrics.json").read_text())  # the job that trained the evaluated model
        if "final_top1" in trained:  # the table's "last epoch" column comes from the training job
            assert float(row["top1_final"].iloc[0]) == pytest.approx(trained["final_top1"])
        if row["method"].iloc[0] == "bsq" and row["variant"].iloc[0] == "finetune":
            pruned = json.loads((path.parent.parent / "prune" / "metrics.json").read_text())
            assert float(row["top1_before_ft"].iloc[0]) == pytest.approx(pruned["top1"])
        if row["method"].iloc[0] == "fracbits":  # equal cost: FracBits' compression is its BSQ run's
            bsq = json.loads(Path(str(path).replace("/fracbits/", "/bsq/")).read_text())
            if trained["budget_met"]:
                assert metrics["compression"] == pytest.approx(bsq["compression"], rel=0.011)
    assert "\\begin{tabular}" in latex and "\\toprule" in latex


@pytest.mark.slow
def test_the_default_demo_shows_bits_falling_with_alpha(finished):
    """The demo's promise (config.yaml): a stronger alpha gives strictly fewer average bits, and each search's
    scheme is the one its last epochs settled on (the prune stage's bits are the search's final projection)."""
    workdir, _ = finished
    summary = pd.read_csv(workdir / "results" / "tables" / "default.csv", dtype={"setting": str})
    bsq = summary[(summary["method"] == "bsq") & (summary["variant"] == "finetune")]
    ordered = bsq.assign(alpha=bsq["setting"].astype(float)).sort_values("alpha")
    assert len(ordered) == 3 and ordered["avg_bits"].is_monotonic_decreasing and ordered["avg_bits"].is_unique
    for setting in ordered["setting"]:
        run = workdir / "results" / "default" / "digits" / "resnet8" / "bsq" / f"alpha-{setting}" / "seed-1"
        history = pd.read_csv(run / "search" / "history.csv")
        last = history["proj_avg_bits"].tail(3)
        assert last.nunique() == 1, f"alpha {setting}: the scheme still moves in the last epochs: {list(last)}"


@pytest.mark.slow
def test_every_job_is_an_mlflow_run_with_lineage(finished):
    import mlflow

    workdir, _ = finished
    runs_uri = f"sqlite:///{workdir}/results/mlflow/mlflow.db"
    mlflow.set_tracking_uri(runs_uri)
    try:
        runs = mlflow.search_runs(search_all_experiments=True)
    finally:
        mlflow.set_tracking_uri(None)
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    n = len(config["alphas"])
    bits = len(config["uniform_bits"])
    stages = runs["tags.bsq.stage"].value_counts().to_dict()
    assert stages == {
        "pretrain": 1,
        "search": n,
        "prune": n,
        "finetune": 2 * n,
        "fracbits": n,
        "uniform": bits,
        "evaluate": 1 + 2 * n + n + bits,
        "aggregate": 1,
        "workflow": 1,  # the run of the invocation
    }
    assert (runs["status"] == "FINISHED").all()
    # One experiment named by the config; one run per invocation, every job's run its direct child (one level);
    # names unique and self-explaining; lineage in tags.
    experiment = mlflow.MlflowClient(runs_uri).get_experiment_by_name(config["name"])
    assert set(runs["experiment_id"]) == {experiment.experiment_id}
    (invocation,) = runs.loc[runs["tags.bsq.stage"] == "workflow", "run_id"]
    jobs = runs[runs["run_id"] != invocation]
    assert (jobs["tags.mlflow.parentRunId"] == invocation).all() and runs["tags.mlflow.runName"].is_unique
    names = set(jobs["tags.mlflow.runName"])
    assert {"float · pretrain · s1", "eval · float · pretrain · s1", "uniform W4 · s1"} <= names
    for alpha in config["alphas"]:
        assert {f"bsq α={alpha} · {step} · s1" for step in ("search", "prune", "finetune", "scratch")} <= names
        assert f"eval · fracbits @ bsq α={alpha} size · s1" in names
    finetunes = runs[(runs["tags.bsq.stage"] == "finetune") & (runs["tags.bsq.variant"] != "scratch")]
    by_id = runs.set_index("run_id")
    for _, run in finetunes.iterrows():
        prune_run = by_id.loc[run["tags.bsq.upstream_run_id"]]
        assert prune_run["tags.bsq.stage"] == "prune" and prune_run["tags.bsq.alpha"] == run["tags.bsq.alpha"]
        assert by_id.loc[run["tags.bsq.search_run_id"], "tags.bsq.stage"] == "search"
        assert by_id.loc[run["tags.bsq.pretrain_run_id"], "tags.bsq.stage"] == "pretrain"


@pytest.mark.slow
def test_report_holds_tables_plots_and_captions(finished):
    workdir, _ = finished
    result = _snakemake(workdir, "--report", "report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    html = (workdir / "report.html").read_text()
    for needle in ("pareto.png", "layer_bits.png", "search_curves.png", "default.csv", "Top-1 accuracy against"):
        assert needle in html, needle


@pytest.mark.slow
def test_rerun_does_nothing_and_a_deleted_output_reruns_only_its_branch(finished):
    workdir, _ = finished
    again = _snakemake(workdir, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    alpha = config["alphas"][1]
    branch = next((workdir / "results").glob(f"default/*/*/bsq/alpha-{alpha}/seed-1"))
    shutil.rmtree(branch / "finetune")
    # Every trained model is a target of `all`, so the deleted output is missing again: exactly that branch re-runs
    # (finetune, its evaluation, the tables), not its search, scratch or FracBits siblings.
    result = _snakemake(workdir, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    assert _job_counts(result.stdout) == {"finetune": 1, "evaluate": 1, "aggregate": 1, "all": 1}
    # `--forcerun <output>` (README) redoes a branch whose files are all still there.
    target = str((branch / "prune" / "scheme.json").relative_to(workdir))
    result = _snakemake(workdir, "-n", "--quiet", "rules", "--forcerun", target)
    assert result.returncode == 0, result.stderr
    assert _job_counts(result.stdout) == {
        "prune": 1,
        "finetune": 1,
        "train_from_scratch": 1,
        "fracbits": 1,
        "evaluate": 3,
        "aggregate": 1,
        "all": 1,
    }

"""Bad workflow input fails at Snakemake's parse time (so `snakemake -n` shows it) with one short message naming the key
and the fix, before any job, file or MLflow run exists; and the tracking-store check that makes this possible."""

from __future__ import annotations

import json
import re
import shlex
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bsq.errors import BSQError
from bsq.tracking import check_tracking_uri
from tests.workflow_helpers import _job_counts, _make_workdir, _snakemake


@pytest.fixture
def workdir(tmp_path):
    return _make_workdir(tmp_path / "work")


def _fails_before_any_job(workdir, result) -> str:
    """The error text of a refused dry run, after checking that nothing was written."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()
    return result.stderr + result.stdout


def _closed_port() -> int:
    """A local port nobody listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- check_tracking_uri -----------------------------------------------------------------------------------------
@pytest.fixture
def http_server():
    """A tiny HTTP server on 127.0.0.1: `answers` maps a path to (status, body); it records the paths asked."""
    answers: dict[str, tuple[int, bytes]] = {}
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.append(self.path)
            status, body = answers.get(self.path.split("?")[0], (404, b"not found"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", answers, asked
    server.shutdown()
    server.server_close()


def test_an_unreachable_tracking_server_fails_in_seconds_naming_the_fix():
    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.perf_counter()
    with pytest.raises(BSQError) as err:
        check_tracking_uri(uri)
    assert time.perf_counter() - started < 3  # MLflow's own client retries for minutes
    message = str(err.value)
    assert message.startswith(f"cannot reach the MLflow tracking server at {uri} (")
    assert "mlflow server" in message and "MLFLOW_TRACKING_URI" in message and "mlflow: false" in message


def test_a_server_answering_health_ok_passes(http_server):
    uri, answers, asked = http_server
    answers["/health"] = (200, b"OK")
    check_tracking_uri(uri + "/")
    assert asked == ["/health"]


def test_a_server_without_health_passes_through_the_experiments_api(http_server):
    uri, answers, asked = http_server
    answers["/api/2.0/mlflow/experiments/search"] = (200, b'{"experiments": []}')
    check_tracking_uri(uri)
    assert asked == ["/health", "/api/2.0/mlflow/experiments/search?max_results=1"]


def test_a_web_server_that_is_not_mlflow_is_refused(http_server):
    uri, _, _ = http_server
    with pytest.raises(BSQError, match=r"HTTP 404 from /health; HTTP 404 from /api/2.0/mlflow/experiments/search"):
        check_tracking_uri(uri)


def test_a_sqlite_store_under_a_file_is_refused_and_a_new_folder_is_not_created(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(BSQError, match=f"{blocker} is a file, not a folder"):
        check_tracking_uri(f"sqlite:///{blocker}/mlflow/mlflow.db")
    check_tracking_uri(f"sqlite:///{tmp_path}/new/mlflow/mlflow.db")
    assert not (tmp_path / "new").exists()  # checked, not created: a dry run writes nothing


# ---- the workflow, at parse time ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        (['alphas=["1","1.0"]'], "alphas lists the same alpha more than once: '1', '1.0' are all 1"),
        (['seeds=[1,"01"]'], "seeds lists the same seed more than once: '1', '01' are all 1"),
        (['seeds=[1,"1.5"]'], "seeds must be whole numbers >= 0 such as [1, 2, 3]; '1.5' is not"),
        (["seeds=[x]"], "seeds must be whole numbers >= 0 such as [1, 2, 3]; 'x' is not"),
        (['uniform_bits=[2,"02"]'], "uniform_bits lists the same bit-width more than once: '2', '02' are all 2"),
        (["fracbits={targets: [0.5, .50]}"], "fracbits.targets lists the same target more than once"),
        (
            ["stages={search: {bsq: {alpha: 100}}}"],
            "stages.search.bsq.alpha (100) is set by the workflow for each job: the search's alpha comes from "
            "`alphas` (one search per value). Remove stages.search.bsq.alpha",
        ),
        (["stages={common: {bsq: {alpha: 100}}}"], "Remove stages.common.bsq.alpha"),
        (["stages={fracbits: {fracbits: {target: 0.5}}}"], "FracBits targets come from `fracbits.targets`"),
        (["stages={common: {fracbits: {match: size}}}"], "Remove stages.common.fracbits.match"),
        (["stages={uniform: {qat: {bits: 3}}}"], "uniform QAT's bits come from `uniform_bits`"),
        (["stages={search: {model: {arch: resnet20}}}"], "the model comes from the top-level `arch`"),
        (["stages={search: {seed: 3}}"], "unknown config key stages.search.seed (use the top-level seeds)"),
        (["stages={fracbits: {optim: {epochs: 1}}}"], "FracBits needs optim.epochs >= 2 (search, then finetune)"),
        (["stages={fracbits: {optim: {epochs: 3}, fracbits: {search_epochs: 3}}}"], "leaves no finetune epoch"),
        (["stages={uniform: {optim: {epochs: 0}}}"], "stages.uniform: the uniform stage needs optim.epochs >= 1"),
        (["stages={pretrain: {optim: {epochs: 0}}}"], "pretrain with optim.epochs = 0 trains nothing"),
        (["stages={common: {fracbits: {cost: bitops}}}"], "fracbits.match: compression needs"),
    ],
)
def test_bad_input_is_one_message_before_any_job(workdir, override, message):
    text = _fails_before_any_job(workdir, _snakemake(workdir, "-n", "--config", *override))
    assert message in text


def test_stages_the_dag_does_not_run_are_not_checked(workdir):
    """A uniform recipe of 0 epochs is no error when uniform QAT is not among the methods."""
    result = _snakemake(
        workdir, "-n", "--quiet", "rules", "--config", "methods=[bsq]", "stages={uniform: {optim: {epochs: 0}}}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "uniform" not in _job_counts(result.stdout) and _job_counts(result.stdout)["bsq_search"] == 3


def test_command_line_values_are_read_as_the_schema_expects(workdir):
    """`fracbits.match: null` and a stage's epochs can be given with --config (Snakemake passes nested values as
    text), and a numeric name stays a name."""
    result = _snakemake(
        workdir,
        "-n",
        "--quiet",
        "rules",
        "--config",
        "fracbits={match: null, targets: [0.02]}",
        "stages={search: {optim: {epochs: 2, milestones: [1]}}}",
        "name=2024",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = _job_counts(result.stdout)
    assert counts["fracbits"] == 1 and counts["bsq_search"] == 3  # one target, no run per alpha


def test_an_unknown_key_is_a_short_error_not_the_schema(workdir):
    result = _snakemake(workdir, "-n", "--config", "nonsense_key=1")
    text = _fails_before_any_job(workdir, result)
    assert len(result.stderr.splitlines()) < 30 and "$defs" not in text and "'description'" not in text
    assert "unknown config key nonsense_key. Allowed keys: preset, name, dataset," in text
    assert "workflow/schemas/config.schema.yaml" in text


def test_a_wrong_value_names_its_key_and_what_it_expects(workdir):
    result = _snakemake(workdir, "-n", "--config", "fracbits={match: sise}")
    text = _fails_before_any_job(workdir, result)
    assert len(result.stderr.splitlines()) < 30
    assert "config fracbits.match: 'sise' is not one of ['compression', 'size', 'bitops', None]" in text


@pytest.mark.parametrize("where", ["config", "env"])
def test_an_unreachable_tracking_server_fails_the_dry_run_quickly(workdir, where):
    uri = f"http://127.0.0.1:{_closed_port()}"
    args = ["--config", f"mlflow_uri={uri}"] if where == "config" else []
    env = {"MLFLOW_TRACKING_URI": uri} if where == "env" else {}
    started = time.perf_counter()
    result = _snakemake(workdir, "-n", *args, env=env)
    assert time.perf_counter() - started < 60  # the parse only; each job would have retried for minutes
    source = "mlflow_uri" if where == "config" else "MLFLOW_TRACKING_URI"
    assert f"{source}: cannot reach the MLflow tracking server at {uri}" in _fails_before_any_job(workdir, result)


def test_tracking_off_skips_the_server_check(workdir):
    result = _snakemake(workdir, "-n", "--config", "mlflow=false", f"mlflow_uri=http://127.0.0.1:{_closed_port()}")
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_yaml_syntax_error_in_the_config_names_file_and_line(workdir):
    config = workdir / "config" / "config.yaml"
    lines = config.read_text().splitlines()
    config.write_text("\n".join([*lines, "alphas: [1", "seeds: [1]"]) + "\n")
    text = _fails_before_any_job(workdir, _snakemake(workdir, "-n"))
    assert "config/config.yaml is not valid YAML" in text
    assert f'in "config/config.yaml", line {len(lines) + 2}' in text  # where the unclosed list runs into a key


def test_a_bad_baselines_cell_names_file_line_and_column(workdir):
    sheet = workdir / "config" / "published_baselines.csv"
    lines = sheet.read_text().splitlines()
    lines[2] = lines[2].replace(",CIFAR-10,", ",CIFAR10,", 1)
    sheet.write_text("\n".join(lines) + "\n")
    text = _fails_before_any_job(workdir, _snakemake(workdir, "-n"))
    assert "baselines: config/published_baselines.csv line 3, column dataset: 'CIFAR10' is not one of" in text


def test_an_unreadable_baselines_sheet_names_the_file(workdir):
    sheet = workdir / "config" / "published_baselines.csv"
    sheet.write_text(sheet.read_text() + "a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r\n")
    text = _fails_before_any_job(workdir, _snakemake(workdir, "-n"))
    assert "baselines: cannot read config/published_baselines.csv: " in text and "Expected 17 fields" in text


def test_the_model_card_rule_takes_only_registered_model_names(workdir):
    """The arch wildcard reaches a shell command: text that is not a model name matches no rule."""
    evil = workdir / "results" / "models" / "x;touch pwned" / "summary.json"
    result = _snakemake(workdir, "-n", str(evil.relative_to(workdir)))
    assert result.returncode != 0 and "No rule to produce" in result.stderr + result.stdout
    result = _snakemake(workdir, "results/models/resnet20/summary.json", "-n", "--quiet", "rules")
    assert result.returncode == 0 and _job_counts(result.stdout) == {"inspect_model": 1}


# ---- the workflow's plumbing: a parse without torch, one runs table, the template rule ---------------------------
def test_a_dry_run_does_not_import_torch(workdir):
    """Parsing the workflow and planning the DAG import bsq.config, bsq.layout and bsq.methods, never torch (each
    parse would pay seconds for it): checked on the interpreter's own import log."""
    result = _snakemake(workdir, "-n", "--quiet", "rules", python=("-X", "importtime"))
    assert result.returncode == 0, result.stderr[-3000:]
    imported = re.findall(r"^import time:.*\|\s+(\S+)$", result.stderr, flags=re.MULTILINE)
    assert "bsq.methods" in imported and "snakemake.workflow" in imported  # the log covers the parse
    assert not [name for name in imported if name == "torch" or name.startswith("torch.")]


def _jobs(output: str) -> dict[str, tuple[str, dict, dict[str, str]]]:
    """--out-dir -> (bsq subcommand, its --config-json, its other flags) for every stage job of `snakemake -n -p`."""
    jobs = {}
    for command in re.findall(r"^Shell command: (.*)$", output, flags=re.MULTILINE):
        if "bsq.cli" not in command:
            continue
        words = shlex.split(command.split(" -m bsq.cli ", 1)[1].split(" > ", 1)[0])
        args = dict(zip(words[1::2], words[2::2], strict=True))
        config = json.loads(args.pop("--config-json", "null"))
        jobs[args.pop("--out-dir")] = (words[0], config, args)
    return jobs


def test_each_job_runs_at_its_point(workdir):
    """Stage configs come from the method registry's points: the search at its alpha (a number), FracBits with the
    matched BSQ run's prune metrics as budget, uniform QAT at its bits; every job of a run carries its labels."""
    result = _snakemake(workdir, "-n", "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(result.stdout + result.stderr)
    runs = "results/default/digits/resnet8"
    stage, search, _ = jobs[f"{runs}/bsq/alpha-0.3/seed-1/search"]
    assert stage == "search" and search["bsq"]["alpha"] == 0.3 and search["labels"] == {"alpha": "0.3"}
    stage, finetune, _ = jobs[f"{runs}/bsq/alpha-0.3/seed-1/finetune"]
    assert "alpha" not in finetune["bsq"] and finetune["labels"] == {"alpha": "0.3"}  # the alpha is the search's
    stage, scratch, args = jobs[f"{runs}/bsq/alpha-0.3/seed-1/scratch"]
    assert stage == "finetune" and scratch["labels"] == {"alpha": "0.3", "variant": "scratch"}
    assert args["--scheme"] == f"{runs}/bsq/alpha-0.3/seed-1/prune/scheme.json"
    stage, fracbits, args = jobs[f"{runs}/fracbits/alpha-1/seed-1/finetune"]
    assert stage == "fracbits" and fracbits["fracbits"]["match"] == "compression"
    assert args == {
        "--checkpoint": f"{runs}/pretrain/seed-1/model.pt",
        "--budget": f"{runs}/bsq/alpha-1/seed-1/prune/metrics.json",
    }
    stage, uniform, _ = jobs[f"{runs}/uniform/bits-2/seed-1/finetune"]
    assert stage == "uniform" and uniform["qat"]["bits"] == 2 and uniform["labels"] == {"bits": "2"}
    stage, pretrain, args = jobs[f"{runs}/pretrain/seed-1"]
    assert stage == "pretrain" and "labels" not in pretrain and args == {}


def test_explicit_fracbits_targets_have_no_budget(workdir):
    result = _snakemake(workdir, "-n", "-p", "--config", "methods=[fracbits]", "fracbits={match: null, targets: [0.5]}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(result.stdout + result.stderr)
    stage, fracbits, args = jobs["results/default/digits/resnet8/fracbits/target-0.5/seed-1/finetune"]
    assert stage == "fracbits" and fracbits["fracbits"]["target"] == 0.5 and "--budget" not in args
    assert {stage for stage, _, _ in jobs.values()} == {"pretrain", "fracbits", "evaluate", "inspect"}


def test_the_template_rule_is_no_job(workdir):
    result = _snakemake(workdir, "-n", "stage_job")
    assert result.returncode != 0
    assert "stage_job is the template of the stage jobs, not a job" in result.stderr + result.stdout


NEW_METHODS = ("csq", "msq", "hawq", "dnas")


def test_every_method_runs_at_every_alpha_at_that_runs_cost(workdir):
    """`--config methods=[bsq,csq,msq,hawq,dnas]` schedules one job per method and alpha, each with the matched BSQ
    run's prune metrics as its budget (equal cost: `<method>.match`, compression by default), and evaluates it."""
    methods = "methods=[bsq," + ",".join(NEW_METHODS) + "]"
    result = _snakemake(workdir, "-n", "-p", "--config", methods, "train_from_scratch=false")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(result.stdout + result.stderr)
    runs = "results/default/digits/resnet8"
    for method in NEW_METHODS:
        for alpha in ("0.1", "0.3", "1"):
            stage, cfg, args = jobs[f"{runs}/{method}/alpha-{alpha}/seed-1/finetune"]
            assert stage == method and cfg[method]["match"] == "compression"
            assert cfg["labels"]["alpha"] == alpha
            assert args == {
                "--checkpoint": f"{runs}/pretrain/seed-1/model.pt",
                "--budget": f"{runs}/bsq/alpha-{alpha}/seed-1/prune/metrics.json",
            }
            assert f"{runs}/{method}/alpha-{alpha}/seed-1/eval-finetune" in jobs
    counts = _job_counts(result.stdout)
    assert all(counts[method] == 3 for method in NEW_METHODS), counts

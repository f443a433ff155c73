"""The MLflow UI as a user sees it: a real `mlflow server` on a store built here, opened in headless Chromium; every
run name is in the experiment's runs list, and the run page shows the description and the upstream run.

Needs Chromium (Debian: `apt-get install -y chromium`); skipped with the reason where none is installed.

Screenshots of a real store (the runs list and one run page), e.g. after the default DAG:
    .venv/bin/python -m tests.test_mlflow_ui results/mlflow/mlflow.db results/screenshots
writes results/screenshots/mlflow_runs.png and results/screenshots/mlflow_run.png.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
# Sorted by name the runs list is flat: with the default order (start time) MLflow nests the children under the
# invocation's run, collapsed.
RUNS_LIST = "#/experiments/{experiment}/runs?orderByKey=attributes.run_name&orderByAsc=true"
RUN_PAGE = "#/experiments/{experiment}/runs/{run}"


def browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(db: Path, timeout: float = 90) -> Iterator[str]:
    """`mlflow server` on the SQLite store `db` (one worker, no job runners), its base URL while the block runs."""
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [
        str(mlflow),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{Path(db).resolve()}",
    ]
    log = open(Path(db).with_suffix(".server.log"), "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {Path(log.name).read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _chromium(*args: str, timeout: float = 120) -> str:
    chrome = browser()
    if chrome is None:
        raise RuntimeError("no Chromium")
    cmd = [
        chrome,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=15000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def page_text(url: str) -> str:
    """The visible text of the page after its scripts ran (the rendered DOM without tags)."""
    dom = _chromium("--dump-dom", url)
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def screenshot(url: str, path: Path, size: str = "1600,1000") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _chromium(f"--screenshot={path.resolve()}", f"--window-size={size}", url)
    return path


def screenshots(db: Path, out: Path, experiment: str | None = None) -> list[Path]:
    """The runs list of the store's experiment (`experiment` name, else the one with the most runs) and the page of
    one run that has upstream runs (a finetune when there is one) -> out/mlflow_runs.png, out/mlflow_run.png."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(db).resolve()}")
    experiments = [e for e in client.search_experiments() if experiment in (None, e.name)]
    runs = {e.experiment_id: client.search_runs([e.experiment_id], max_results=1000) for e in experiments}
    exp = max(runs, key=lambda k: len(runs[k]))
    linked = [r for r in runs[exp] if r.data.tags.get("bsq.upstream_run_id")]
    trained = [r for r in linked if not r.info.run_name.startswith("eval")]
    page = next((r for r in trained if "finetune" in r.info.run_name), (trained or linked or runs[exp])[0])
    with serve(db) as url:
        return [
            screenshot(url + RUNS_LIST.format(experiment=exp), out / "mlflow_runs.png", "1600,1500"),
            screenshot(
                url + RUN_PAGE.format(experiment=exp, run=page.info.run_id), out / "mlflow_run.png", "1600,1500"
            ),
        ]


@pytest.mark.slow
@pytest.mark.skipif(browser() is None, reason="no Chromium here (Debian: apt-get install -y chromium)")
def test_ui_lists_every_run_and_shows_the_lineage(tmp_path):
    from bsq.tracking import Tracker, end_invocation_run, start_invocation_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = start_invocation_run("ui-check", {"name": "ui-check"}, uri=uri)
    names = [
        "float · pretrain · s1",
        "bsq α=3 · search · s1",
        "bsq α=3 · finetune · s1",
        "uniform W4 · s1",
        "eval · bsq α=3 · finetune · s1",
    ]
    ids: dict[str, str] = {}
    for name in names:
        upstream = ids.get("bsq α=3 · search · s1") if "finetune" in name else None
        note = f"**{name}**" + (f": after [bsq α=3 · search · s1](#/experiments/1/runs/{upstream})" if upstream else "")
        tags = {"bsq.upstream_run_id": upstream} if upstream else {}
        with Tracker("ui-check", name, uri=uri, parent_run_id=parent, description=note, tags=tags) as t:
            t.log_metrics({"top1": 90.0})
            t.log_dataset("digits", "file:///data/digits.csv.gz", "0123456789ab", "train")
        ids.setdefault(name, t.run_id)
    end_invocation_run(parent, uri=uri)
    from mlflow import MlflowClient

    experiment = MlflowClient(uri).get_experiment_by_name("ui-check").experiment_id
    with serve(tmp_path / "mlflow.db") as url:
        listing = page_text(url + RUNS_LIST.format(experiment=experiment))
        missing = [n for n in [*names, "ui-check · "] if n not in listing]
        assert not missing, f"not in the runs list: {missing}\n{listing[:3000]}"
        assert "digits (0123456789ab)" in listing  # the dataset column
        finetune = ids["bsq α=3 · finetune · s1"]
        page = page_text(url + RUN_PAGE.format(experiment=experiment, run=finetune))
        assert "bsq α=3 · finetune · s1" in page and "after bsq α=3 · search · s1" in page, page[:3000]
        shots = [screenshot(url + RUNS_LIST.format(experiment=experiment), tmp_path / "runs.png")]
    assert shots[0].read_bytes()[:4] == b"\x89PNG"


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m tests.test_mlflow_ui <store.db> <out folder> [experiment]")
    if browser() is None:
        sys.exit("no Chromium here (Debian: apt-get install -y chromium)")
    for written in screenshots(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None):
        print(written)

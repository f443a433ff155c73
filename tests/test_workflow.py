"""The Snakemake workflow: lint-clean, validated config, and a real run whose outputs match the library."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(workdir)}
    return subprocess.run(
        [*SNAKEMAKE, "-s", str(PROJECT_ROOT / "Snakefile"), "-d", str(workdir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
    )


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "config").mkdir()
    shutil.copy(PROJECT_ROOT / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    return tmp_path


def test_default_config_dry_run_lists_one_job_per_model(workdir):
    result = _snakemake(workdir, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    models = yaml.safe_load((workdir / "config" / "config.yaml").read_text())["models"]
    counts = {
        line.split()[0]: int(line.split()[-1])
        for line in result.stdout.splitlines()
        if line[:1].isalpha() and len(line.split()) == 2 and line.split()[-1].isdigit()
    }
    assert counts["inspect_model"] == len(models) and counts["all"] == 1


@pytest.mark.parametrize(
    "override, message",
    [("models=[resnet21]", "resnet21"), ("initial_bits=0", "initial_bits"), ("colour=blue", "colour")],
)
def test_bad_config_fails_before_any_job(workdir, override, message):
    result = _snakemake(workdir, "-n", "--config", override)
    assert result.returncode != 0 and message in result.stderr + result.stdout
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_run_writes_cards_matching_the_library(workdir):
    result = _snakemake(workdir, "--cores", "1", "--config", "models=[resnet8]")
    assert result.returncode == 0, result.stderr
    summary = json.loads((workdir / "results/models/resnet8/summary.json").read_text())
    from bsq.metrics import summary as model_summary
    from bsq.models import create_model
    from bsq.quant.convert import quantize_model

    expected = model_summary(quantize_model(create_model("resnet8")))
    assert summary["quantized_params"] == expected["quantized_params"] and summary["compression"] == 4.0
    again = _snakemake(workdir, "--cores", "1", "--config", "models=[resnet8]")
    assert "Nothing to be done" in again.stdout + again.stderr

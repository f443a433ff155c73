"""Helpers of the workflow tests: Snakemake on the project's Snakefile in a fresh working folder, and the job counts
of a dry run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _snakemake(
    workdir: Path, *args: str, env: dict[str, str] | None = None, python: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Snakemake on the project's Snakefile in `workdir`, with a bare environment plus `env` (`python`: options of
    the interpreter, e.g. ("-X", "importtime"))."""
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(workdir), "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, *python, *SNAKEMAKE[1:], "-s", str(PROJECT_ROOT / "Snakefile"), "-d", str(workdir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
    )


def _make_workdir(path: Path) -> Path:
    """A working folder holding the default config, the published baselines and the experiment overlays."""
    (path / "config").mkdir(parents=True)
    for name in ("config.yaml", "published_baselines.csv"):
        shutil.copy(PROJECT_ROOT / "config" / name, path / "config" / name)
    shutil.copytree(PROJECT_ROOT / "config" / "experiments", path / "config" / "experiments")
    return path


def _job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from the job-stats table of a dry run."""
    counts = {}
    for line in output.splitlines():
        match = re.fullmatch(r"([a-z_]+)\s+(\d+)", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts

"""Wall time of the whole default DAG (`make run`'s job) in a fresh folder, with the CPU seconds per rule.

Run:  .venv/bin/python benchmarks/dag_time.py [--cores 2] [--configfile config/experiments/....yaml --config ...]
The workflow runs in a temporary directory (nothing under results/ is touched) and every job's `benchmark:` file
gives its own seconds; prints one JSON line and appends it to results/benchmarks.jsonl. The issue-4 goal is under 10
minutes on 2 CPU cores for the embedded default.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import ROOT, append_result, environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to results/")
    parser.add_argument("--keep", help="copy the run's results/tables and results/plots into this folder")
    args, extra = parser.parse_known_args()  # anything else goes to snakemake (--configfile, --config, ...)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "config", work / "config")
        bin_dir = str(Path(sys.executable).parent)
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", tmp, "--cores", str(args.cores)]
        started = time.perf_counter()
        result = subprocess.run(
            [*cmd, *extra],
            cwd=tmp,
            capture_output=True,
            text=True,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": tmp, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"snakemake failed:\n{result.stderr[-3000:]}")
        listed = subprocess.run([*cmd, "--list-rules"], cwd=tmp, capture_output=True, text=True).stdout.split()
        per_rule: dict[str, float] = defaultdict(float)
        jobs: dict[str, int] = defaultdict(int)
        for path in (work / "benchmarks" / "logs").rglob("*.tsv"):
            parts = [part.removesuffix(".tsv") for part in path.relative_to(work).parts]
            # benchmark paths mirror the outputs (<name>/<dataset>/<arch>/<rule>/...): the first rule name is the rule
            rule = next(part for part in parts if part in listed)
            with open(path) as fh:
                row = next(csv.DictReader(fh, delimiter="\t"))
            per_rule[rule] += float(row["s"])
            jobs[rule] += 1
        if args.keep:
            for part in ("tables", "plots"):
                shutil.copytree(work / "results" / part, Path(args.keep) / part, dirs_exist_ok=True)
    line = {
        "benchmark": "dag_time",
        "cores": args.cores,
        "snakemake_args": extra,
        "wall_s": round(wall, 1),
        "jobs": sum(jobs.values()),
        "job_seconds": round(sum(per_rule.values()), 1),
        "seconds_per_rule": {rule: round(s, 1) for rule, s in sorted(per_rule.items())},
        "jobs_per_rule": dict(sorted(jobs.items())),
        **environment("cpu"),
    }
    print(json.dumps(line))
    if not args.no_append:
        append_result(line)


if __name__ == "__main__":
    main()

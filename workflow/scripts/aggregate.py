"""Snakemake adapter of rule `aggregate`: read everything from the `snakemake` object, call bsq.report once."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821, SIM115 (the log stays open for the whole job)

from bsq.report import write_report  # noqa: E402
from bsq.tracking import Tracker, invocation_parent  # noqa: E402

sm = snakemake  # noqa: F821
outputs = {key: sm.output[key] for key in ("runs", "csv", "md", "tex", "html", "pareto", "layer_bits", "search_curves")}
summary = write_report(
    evaluations=sm.params.evaluations,
    search_histories={alpha: sm.input[f"history_{alpha}"] for alpha in sm.params.alphas},
    schemes={key: sm.input[f"scheme_{i}"] for i, key in enumerate(sm.params.schemes)},
    baselines=sm.input.baselines,
    outputs=outputs,
    title=sm.params.title,
)
print(summary.to_string(), file=sys.stderr)

tracking = sm.params.tracking
with Tracker(
    experiment=tracking["experiment"],
    run_name=tracking["run_name"],
    uri=tracking["uri"],
    tags={"bsq.stage": "aggregate", "snakemake.rule": "aggregate", "bsq.experiment": tracking["experiment"]},
    parent_run_id=invocation_parent(),  # a child of the workflow invocation's run, as every job
    description=f"**{tracking['run_name']}**: the tables and plots of every run of config `{tracking['experiment']}` "
    "(artifacts under report/).",
    enabled=tracking["enabled"],
) as tracker:
    for path in outputs.values():
        tracker.log_artifact(path, "report")

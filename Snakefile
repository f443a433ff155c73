# bsq-repro: pretrain -> BSQ search (per alpha x seed) -> prune -> finetune / train from scratch -> evaluate ->
# aggregate, with FracBits (at each BSQ run's cost) and uniform QAT from the same float model. Rules live in
# workflow/rules/*.smk and call the `bsq` CLI; the algorithms live in the `bsq` library, the methods and the points
# they run at in its registry (bsq.methods). Parsing the workflow does not import torch (jobs do).
# Run: `snakemake --cores N` (config/config.yaml), add `--configfile config/experiments/<name>.yaml` for a paper
# recipe, or `--profile workflow/profiles/slurm` on a cluster (machine settings: workflow/profiles/*).
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/config_checks.smk"


check_yaml_file("config/config.yaml")  # Snakemake's own YAML error names neither file nor line


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"  # the runs table, stage configs, paths and targets
include: "workflow/rules/stage_job.smk"  # the template rule of every stage job
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/bsq.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/inspect.smk"
include: "workflow/rules/invocation.smk"  # MLflow: one parent run per invocation; the end-of-run summary


rule all:
    input:
        all_targets(),
    default_target: True

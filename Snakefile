# bsq-repro: entry point. Rules live in workflow/rules/*.smk; logic lives in the `bsq` library and CLI.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/inspect.smk"


rule all:
    input:
        all_targets(),
    default_target: True

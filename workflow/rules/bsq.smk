# BSQ's chain, per alpha x seed: search from the float model converted to 8-bit planes (spec sections 2-3), prune
# (the final re-quantization that fixes the scheme), finetune with the scheme fixed, and the paper's Table 1
# train-from-scratch baseline. The job boilerplate is the template's (common.smk: rule stage_job).
BSQ = f"{run_dir('bsq')}"  # results/.../bsq/{point}/seed-{seed}


use rule stage_job as bsq_search with:
    message:
        "BSQ search {wildcards.point} seed={wildcards.seed}"
    input:
        checkpoint=rules.pretrain.output.checkpoint,
    output:
        **stage_outputs("search", f"{BSQ}/search"),
    params:
        **job_params("search"),
    log:
        job_log("bsq_search", "{point}/seed-{seed}"),
    benchmark:
        job_benchmark("bsq_search", "{point}/seed-{seed}")
    resources:
        **machine("search"),
    wildcard_constraints:
        point=slugs("bsq"),


# One pass over the test set: one process, at most one GPU (launch follows the `gpu` resource).
use rule stage_job as prune with:
    message:
        "Prune (final re-quantization) {wildcards.point} seed={wildcards.seed}"
    input:
        checkpoint=rules.bsq_search.output.checkpoint,
    output:
        **stage_outputs("prune", f"{BSQ}/prune"),
    params:
        **job_params("prune"),
    log:
        job_log("prune", "{point}/seed-{seed}"),
    benchmark:
        job_benchmark("prune", "{point}/seed-{seed}")
    threads: threads(one_pass=True)
    resources:
        **machine("evaluate", one_pass=True),
    wildcard_constraints:
        point=slugs("bsq"),


# Keeps the best epoch in bit and float form (spec section 5).
use rule stage_job as finetune with:
    message:
        "Finetune {wildcards.point} seed={wildcards.seed}"
    input:
        checkpoint=rules.prune.output.checkpoint,
    output:
        **stage_outputs("finetune", f"{BSQ}/finetune"),
    params:
        **job_params("finetune"),
    log:
        job_log("finetune", "{point}/seed-{seed}"),
    benchmark:
        job_benchmark("finetune", "{point}/seed-{seed}")
    resources:
        **machine("finetune"),
    wildcard_constraints:
        point=slugs("bsq"),


# The paper's Table 1 baseline: the same scheme applied to the float model directly, finetuned with the same recipe.
use rule stage_job as train_from_scratch with:
    message:
        "Train from scratch with the scheme of {wildcards.point} seed={wildcards.seed}"
    input:
        checkpoint=rules.pretrain.output.checkpoint,
        scheme=rules.prune.output.scheme,
    output:
        **stage_outputs("finetune", f"{BSQ}/scratch"),
    params:
        **job_params("finetune", variant="scratch"),
    log:
        job_log("train_from_scratch", "{point}/seed-{seed}"),
    benchmark:
        job_benchmark("train_from_scratch", "{point}/seed-{seed}")
    resources:
        **machine("finetune"),
    wildcard_constraints:
        point=slugs("bsq"),

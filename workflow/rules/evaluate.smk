# Test-set accuracy and costs (avg bits, compression, size, BitOPs) of every method's final model, measured alike:
# one pass over the test set, so one process and at most one GPU.
use rule stage_job as evaluate with:
    message:
        "Evaluate {wildcards.method} {wildcards.point} ({wildcards.variant}) seed={wildcards.seed}"
    input:
        checkpoint=evaluated_checkpoint,
    output:
        **stage_outputs("evaluate", f"{run_dir()}/eval-{{variant}}"),
    params:
        **job_params("evaluate"),
    log:
        job_log("evaluate", "{method}/{point}/seed-{seed}/{variant}"),
    benchmark:
        job_benchmark("evaluate", "{method}/{point}/seed-{seed}/{variant}")
    threads: threads(one_pass=True)
    resources:
        **machine("evaluate", one_pass=True),


# The full-precision reference row of the tables.
use rule stage_job as evaluate_pretrain with:
    message:
        "Evaluate the full-precision model (seed {wildcards.seed})"
    input:
        checkpoint=rules.pretrain.output.checkpoint,
    output:
        **stage_outputs("evaluate", f"{pretrain_dir()}/eval"),
    params:
        **job_params("evaluate"),
    log:
        job_log("evaluate_pretrain", "seed-{seed}"),
    benchmark:
        job_benchmark("evaluate_pretrain", "seed-{seed}")
    threads: threads(one_pass=True)
    resources:
        **machine("evaluate", one_pass=True),

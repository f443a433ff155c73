# Full-precision model: trained with the pretrain recipe, or imported from `pretrained` (e.g. the authors' file).
use rule stage_job as pretrain with:
    message:
        "Pretrain {config[arch]} on {config[dataset]} (seed {wildcards.seed})"
    input:
        unpack(pretrained_input),
    output:
        **stage_outputs("pretrain", pretrain_dir()),
    params:
        **job_params("pretrain"),
    log:
        job_log("pretrain", "seed-{seed}"),
    benchmark:
        job_benchmark("pretrain", "seed-{seed}")
    resources:
        **machine("pretrain"),

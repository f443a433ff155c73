# Test-set accuracy and costs (avg bits, compression, size, BitOPs) of every method's final model, measured alike.
rule evaluate:
    message:
        "Evaluate {wildcards.method} {wildcards.point} ({wildcards.variant}) seed={wildcards.seed}"
    input:
        checkpoint=evaluated_checkpoint,
    output:
        **stage_outputs("evaluate", f"{run_dir()}/eval-{{variant}}"),
    params:
        config=stage_args("evaluate"),
        out_dir=out_dir,
        launch=f"{shlex.quote(sys.executable)} -m bsq.cli",
    log:
        f"{LOGS}/evaluate/{{method}}/{{point}}/seed-{{seed}}/{{variant}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{method}}/{{point}}/seed-{{seed}}/{{variant}}.tsv"
    conda:
        "../../environment.yml"
    threads: EVAL_THREADS
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["evaluate"],
        gpu=min(config["gpus"], 1),
    shell:
        "{params.launch} evaluate --config-json {params.config} --checkpoint {input.checkpoint}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# The full-precision reference row of the tables.
rule evaluate_pretrain:
    message:
        "Evaluate the full-precision model (seed {wildcards.seed})"
    input:
        checkpoint=rules.pretrain.output.checkpoint,
    output:
        **stage_outputs("evaluate", f"{pretrain_dir()}/eval"),
    params:
        config=stage_args("evaluate"),
        out_dir=out_dir,
        launch=f"{shlex.quote(sys.executable)} -m bsq.cli",
    log:
        f"{LOGS}/evaluate_pretrain/seed-{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate_pretrain/seed-{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: EVAL_THREADS
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["evaluate"],
        gpu=min(config["gpus"], 1),
    shell:
        "{params.launch} evaluate --config-json {params.config} --checkpoint {input.checkpoint}"
        " --out-dir {params.out_dir} > {log} 2>&1"

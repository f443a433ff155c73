# BSQ search once per alpha x seed, from the float model converted to 8-bit planes (spec sections 2-3).
rule bsq_search:
    message:
        "BSQ search alpha={wildcards.alpha} seed={wildcards.seed}"
    input:
        checkpoint=rules.pretrain.output.checkpoint,
    output:
        **stage_outputs("search", f"{bsq_dir()}/search"),
    params:
        config=stage_args("search"),
        out_dir=out_dir,
        launch=launcher(),
    log:
        f"{LOGS}/bsq_search/alpha-{{alpha}}/seed-{{seed}}.log",
    benchmark:
        f"{BENCH}/bsq_search/alpha-{{alpha}}/seed-{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["search"],
        gpu=config["gpus"],
    shell:
        "{params.launch} search --config-json {params.config} --checkpoint {input.checkpoint}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# Precision pruning: the final re-quantization that fixes the mixed-precision scheme (scheme.json).
rule prune:
    message:
        "Prune (final re-quantization) alpha={wildcards.alpha} seed={wildcards.seed}"
    input:
        checkpoint=rules.bsq_search.output.checkpoint,
    output:
        **stage_outputs("prune", f"{bsq_dir()}/prune"),
    params:
        config=stage_args("prune"),
        out_dir=out_dir,
        launch=f"{shlex.quote(sys.executable)} -m bsq.cli",  # one pass over the test set: one process, one GPU
    log:
        f"{LOGS}/prune/alpha-{{alpha}}/seed-{{seed}}.log",
    benchmark:
        f"{BENCH}/prune/alpha-{{alpha}}/seed-{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: EVAL_THREADS
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["evaluate"],
        gpu=min(config["gpus"], 1),
    shell:
        "{params.launch} prune --config-json {params.config} --checkpoint {input.checkpoint}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# Finetune with the scheme fixed (spec section 5); keeps the best epoch in bit and float form.
rule finetune:
    message:
        "Finetune alpha={wildcards.alpha} seed={wildcards.seed}"
    input:
        checkpoint=rules.prune.output.checkpoint,
    output:
        **stage_outputs("finetune", f"{bsq_dir()}/finetune"),
    params:
        config=stage_args("finetune"),
        out_dir=out_dir,
        launch=launcher(),
    log:
        f"{LOGS}/finetune/alpha-{{alpha}}/seed-{{seed}}.log",
    benchmark:
        f"{BENCH}/finetune/alpha-{{alpha}}/seed-{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["finetune"],
        gpu=config["gpus"],
    shell:
        "{params.launch} finetune --config-json {params.config} --checkpoint {input.checkpoint}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# The paper's Table 1 baseline: the same scheme applied to the float model directly, finetuned with the same recipe.
rule train_from_scratch:
    message:
        "Train from scratch with the scheme of alpha={wildcards.alpha} seed={wildcards.seed}"
    input:
        checkpoint=rules.pretrain.output.checkpoint,
        scheme=rules.prune.output.scheme,
    output:
        **stage_outputs("finetune", f"{bsq_dir()}/scratch"),
    params:
        config=stage_args("finetune", variant="scratch"),
        out_dir=out_dir,
        launch=launcher(),
    log:
        f"{LOGS}/train_from_scratch/alpha-{{alpha}}/seed-{{seed}}.log",
    benchmark:
        f"{BENCH}/train_from_scratch/alpha-{{alpha}}/seed-{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["finetune"],
        gpu=config["gpus"],
    shell:
        "{params.launch} finetune --config-json {params.config} --checkpoint {input.checkpoint}"
        " --scheme {input.scheme} --out-dir {params.out_dir} > {log} 2>&1"

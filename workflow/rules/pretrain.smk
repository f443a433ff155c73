# Full-precision model: trained with the pretrain recipe, or imported from `pretrained` (e.g. the authors' file).
rule pretrain:
    message:
        "Pretrain {config[arch]} on {config[dataset]} (seed {wildcards.seed})"
    input:
        unpack(pretrained_input),
    output:
        **stage_outputs("pretrain", pretrain_dir()),
    params:
        config=stage_args("pretrain"),
        out_dir=out_dir,
        launch=launcher(),
        source=import_flag,
    log:
        f"{LOGS}/pretrain/seed-{{seed}}.log",
    benchmark:
        f"{BENCH}/pretrain/seed-{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["pretrain"],
        gpu=config["gpus"],
    shell:
        "{params.launch} pretrain --config-json {params.config} {params.source} --out-dir {params.out_dir}"
        " > {log} 2>&1"

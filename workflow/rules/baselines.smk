# The baselines the suite runs itself, from the same float model as BSQ: FracBits (fracbits.md) and uniform QAT.


# FracBits, one run (search -> hard assignment -> finetune) per point: at a BSQ alpha's measured compression (or size /
# BitOPs, `fracbits.match`) so the table compares at equal cost, or at an explicit target (`fracbits.targets`).
rule fracbits:
    message:
        "FracBits {wildcards.point} seed={wildcards.seed}"
    input:
        unpack(fracbits_inputs),
    output:
        **stage_outputs("fracbits", f"{run_dir('fracbits')}/finetune"),
    params:
        config=stage_args("fracbits"),
        out_dir=out_dir,
        launch=launcher(),
        budget=budget_flag,
    log:
        f"{LOGS}/fracbits/{{point}}/seed-{{seed}}.log",
    benchmark:
        f"{BENCH}/fracbits/{{point}}/seed-{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["fracbits"],
        gpu=config["gpus"],
    shell:
        "{params.launch} fracbits --config-json {params.config} --checkpoint {input.checkpoint} {params.budget}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# Uniform-precision QAT at each of `uniform_bits` (first conv and last linear at 8 bits), same quantizers as FracBits.
rule uniform:
    message:
        "Uniform QAT W{wildcards.bits} seed={wildcards.seed}"
    input:
        checkpoint=rules.pretrain.output.checkpoint,
    output:
        **stage_outputs("uniform", f"{run_dir('uniform', 'bits-{bits}')}/finetune"),
    params:
        config=stage_args("uniform"),
        out_dir=out_dir,
        launch=launcher(),
    log:
        f"{LOGS}/uniform/bits-{{bits}}/seed-{{seed}}.log",
    benchmark:
        f"{BENCH}/uniform/bits-{{bits}}/seed-{{seed}}.tsv"
    conda:
        "../../environment.yml"
    threads: config["threads"]
    resources:
        mem_mb=config["mem_mb"],
        runtime=RUNTIME["uniform"],
        gpu=config["gpus"],
    shell:
        "{params.launch} uniform --config-json {params.config} --checkpoint {input.checkpoint}"
        " --out-dir {params.out_dir} > {log} 2>&1"

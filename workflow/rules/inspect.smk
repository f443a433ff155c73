# Convert the configured model to BSQ's initial bit-plane form and record its per-layer costs.
from bsq.model_catalog import list_models  # torch-free: the names only


rule inspect_model:
    message:
        "Bit-plane card of {params.arch} at {params.nbits} bits"
    output:
        table="results/models/{arch}/layers.csv",
        summary="results/models/{arch}/summary.json",
    wildcard_constraints:
        arch=_alternatives(list_models()),  # a registered model name, never arbitrary text in the shell command
    params:
        arch=lambda wildcards: shlex.quote(wildcards.arch),
        nbits=initial_bits(),
        act_bits=config["act_bits"] or "none",
        out_dir=out_dir,
        launch=launcher(1),
    log:
        "logs/inspect_model/{arch}.log",
    benchmark:
        "benchmarks/logs/inspect_model/{arch}.tsv"
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.launch} inspect --arch {params.arch} --nbits {params.nbits} --act-bits {params.act_bits}"
        " --out-dir {params.out_dir} > {log} 2>&1"

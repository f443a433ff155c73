# Convert each configured model to BSQ's initial bit-plane form and record its per-layer costs.
rule inspect_model:
    message:
        "Bit-plane card of {wildcards.arch} at {params.nbits} bits"
    output:
        table="results/models/{arch}/layers.csv",
        summary="results/models/{arch}/summary.json",
    params:
        nbits=config["initial_bits"],
        act_bits=config["act_bits"],
        out_dir=directory_of_model,
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
        "bsq inspect --arch {wildcards.arch} --nbits {params.nbits} --act-bits {params.act_bits}"
        " --out-dir {params.out_dir} > {log} 2>&1"

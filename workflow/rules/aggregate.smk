# Paper-style tables and plots: every run of this config beside the published numbers for the same model.
rule aggregate:
    message:
        "Tables and plots for {NAME}"
    input:
        unpack(aggregate_inputs),
    output:
        runs=report(TABLES["runs"], caption="../report/runs.rst", category="Tables"),
        csv=report(TABLES["csv"], caption="../report/summary.rst", category="Tables"),
        md=TABLES["md"],
        tex=TABLES["tex"],
        pareto=report(PLOTS["pareto"], caption="../report/pareto.rst", category="Plots"),
        layer_bits=report(PLOTS["layer_bits"], caption="../report/layer_bits.rst", category="Plots"),
        search_curves=report(PLOTS["search_curves"], caption="../report/search_curves.rst", category="Plots"),
    params:
        evaluations=evaluations(),
        alphas=list(search_histories()),
        schemes=list(scheme_files()),
        title=f"{NAME}: {config['dataset']} / {config['arch']}",
        tracking={
            "enabled": config["mlflow"],
            "uri": config["mlflow_uri"],
            "experiment": f"bsq-repro-{config['dataset']}-{config['arch']}",
            "run_name": f"aggregate/{NAME}",
        },
    log:
        f"logs/{NAME}/aggregate.log",
    benchmark:
        f"benchmarks/logs/{NAME}/aggregate.tsv"
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    script:
        "../scripts/aggregate.py"

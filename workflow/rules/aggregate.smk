# Paper-style tables and plots: every run of this config beside the published numbers for the same model.
# `snakemake --report report.html` shows them: the workflow description (report/workflow.rst), the comparison
# table as HTML (with the published rows and the source list), every plot with its caption, the CSV / LaTeX files.
import importlib


report: "../report/workflow.rst"


REPORT_TABLE = f"results/tables/{NAME}.html"  # the comparison table as the report shows it
LABELS = {"config": NAME, "model": f"{config['dataset']} / {config['arch']}"}

# End of a run (called by the Snakefile's onsuccess): a few-line headline table, then where the tables, plots and
# report are, and the MLflow UI command. The code lives in bsq.report (imported only then: parsing stays fast).
print_run_summary = lambda: importlib.import_module("bsq.report").print_run_summary(
    NAME, config, TABLES, PLOTS, REPORT_TABLE
)


rule aggregate:
    message:
        "Tables and plots for {NAME}"
    input:
        unpack(aggregate_inputs),
    output:
        html=report(
            REPORT_TABLE,
            caption="../report/table.rst",
            category="1. Comparison table",
            labels={**LABELS, "content": "methods vs published (HTML)"},
        ),
        pareto=report(
            PLOTS["pareto"],
            caption="../report/pareto.rst",
            category="2. Plots",
            labels={**LABELS, "content": "accuracy vs compression"},
        ),
        layer_bits=report(
            PLOTS["layer_bits"],
            caption="../report/layer_bits.rst",
            category="2. Plots",
            labels={**LABELS, "content": "per-layer weight bits"},
        ),
        search_curves=report(
            PLOTS["search_curves"],
            caption="../report/search_curves.rst",
            category="2. Plots",
            labels={**LABELS, "content": "BSQ search curves"},
        ),
        csv=report(
            TABLES["csv"],
            caption="../report/summary.rst",
            category="3. Data files",
            labels={**LABELS, "content": "mean and std per setting (CSV)"},
        ),
        runs=report(
            TABLES["runs"],
            caption="../report/runs.rst",
            category="3. Data files",
            labels={**LABELS, "content": "every run (CSV)"},
        ),
        tex=report(
            TABLES["tex"],
            caption="../report/latex.rst",
            category="3. Data files",
            labels={**LABELS, "content": "comparison table (LaTeX)"},
        ),
        md=TABLES["md"],
    params:
        evaluations=evaluations(),
        alphas=list(search_histories()),
        schemes=list(scheme_files()),
        title=f"{NAME}: {config['dataset']} / {config['arch']}",
        tracking={
            "enabled": config["mlflow"],
            "uri": config["mlflow_uri"],
            "experiment": NAME,
            "run_name": f"aggregate · {NAME}",
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

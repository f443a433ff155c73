# The baselines the suite runs itself, from the same float model as BSQ: FracBits (fracbits.md) and uniform QAT.
# Both are one-stage methods (bsq.methods: one stage from the float model, its model in finetune/), and so is any
# method registered later with one stage: each gets a rule named after it, generated here from the registry, one job
# per point x seed. Snakemake names `use rule` copies literally, so these rules repeat the template's directives
# (rule stage_job), with the same helpers.
#   FracBits: one run (search -> hard assignment -> finetune) per point: at a BSQ run's measured compression (or size /
#     BitOPs, `fracbits.match`; the budget input is that run's prune metrics, Point.budget_of) so the table compares
#     at equal cost, or at an explicit target (`fracbits.targets`).
#   Uniform QAT: at each of `uniform_bits` (first conv and last linear at 8 bits), same quantizers as FracBits.
for _method in one_stage_methods():
    _stage = get_method(_method).stages[0].name
    _title = get_method(_method).summary.split(":", 1)[0]  # "FracBits", "Uniform QAT"

    rule:
        name:
            _method
        message:
            f"{_title} {{wildcards.point}} seed={{wildcards.seed}}"
        input:
            unpack(budgeted_inputs(_method)),
        output:
            **stage_outputs(_stage, f"{run_dir(_method)}/finetune"),
        params:
            **job_params(_stage),
        log:
            job_log(_method, "{point}/seed-{seed}"),
        benchmark:
            job_benchmark(_method, "{point}/seed-{seed}")
        conda:
            "../../environment.yml"
        threads: threads()
        resources:
            **machine(_stage),
        wildcard_constraints:
            point=slugs(_method),
        shell:
            STAGE_SHELL

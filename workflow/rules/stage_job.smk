# The template of every stage job: each rule is `use rule stage_job as <rule> with:`, setting its stage and config
# (job_params), its files, message and, where they differ, threads and resources. It runs nothing itself.
# Machine settings are Snakemake's own: `--set-threads`, `--set-resources`, `--default-resources` or a profile
# (workflow/profiles/*/config.v9+.yaml). The rule's `gpu` resource is the config's `gpus` (training) or at most one,
# and the launcher follows it (torchrun for more than one).
rule stage_job:
    message:
        "template of the stage jobs (not a job)"
    log:
        f"{LOGS}/stage_job.log",
    params:
        **job_params(None),
    conda:
        "../../environment.yml"
    threads: threads()
    resources:
        **machine(),
    shell:
        STAGE_SHELL

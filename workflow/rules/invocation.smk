# ---- MLflow: one run per invocation, every job's run its direct child -------------------------------------------
# Not on dry runs (Snakemake calls these hooks only when jobs run; spawned jobs get --no-hooks). Local jobs inherit
# BSQ_PARENT_RUN_ID from this process; SLURM jobs too (sbatch exports the environment by default).
def _invocation_uri():
    from bsq.tracking import default_tracking_uri

    return config["mlflow_uri"] or default_tracking_uri()


onstart:
    if config["mlflow"]:
        from bsq.tracking import PARENT_ENV, start_invocation_run

        os.environ[PARENT_ENV] = start_invocation_run(
            NAME,
            config,
            uri=_invocation_uri(),
            description=(
                f"**{NAME}**: one `snakemake` invocation of config `{NAME}` ({config['dataset']} / "
                f"{config['arch']}); every job it ran is a child run of this one. Upstream runs of each job are "
                "linked in that job's description and tags (bsq.upstream_run_id, bsq.<stage>_run_id)."
            ),
        )


onsuccess:
    if "print_run_summary" in globals():
        print_run_summary()
    if config["mlflow"]:
        from bsq.tracking import PARENT_ENV, end_invocation_run

        end_invocation_run(os.environ.get(PARENT_ENV), "FINISHED", uri=_invocation_uri())


onerror:
    if config["mlflow"]:
        from bsq.tracking import PARENT_ENV, end_invocation_run

        end_invocation_run(os.environ.get(PARENT_ENV), "FAILED", uri=_invocation_uri())

"""One exception type for every user-facing mistake, so the CLI can print it without a traceback."""


class BSQError(ValueError):
    """A bad input (config value, checkpoint, scheme, model name) with a message that names the fix."""


class StageInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what SLURM sends on `scancel` and at the time limit) turned into an exception, so the
    job ends as on Ctrl-C: MLflow run KILLED, resume file kept, exit code 128 + signal."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

"""One exception type for every user-facing mistake, so the CLI can print it without a traceback."""


class BSQError(ValueError):
    """A bad input (config value, checkpoint, scheme, model name) with a message that names the fix."""

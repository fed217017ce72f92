"""Errors that describe a user mistake: the CLI prints them as one line, no traceback."""


class KernelizeError(Exception):
    """A failure the user can act on (bad input, unsupported model, failed check).

    The CLI turns it into a one-line message and exit code 1.
    """


class UsageError(KernelizeError):
    """A wrong invocation: unknown recipe, backend or option value. Exit code 2."""

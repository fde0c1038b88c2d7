"""The platform's user-facing error base: the CLI prints these as one line, never a traceback."""


class OptError(Exception):
    """An error caused by input or environment, with a message naming the problem and what to do."""

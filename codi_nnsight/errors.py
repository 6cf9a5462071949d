"""Errors that the CLI reports as one clean line with exit code 2."""


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a config): shown as one line, never a traceback."""

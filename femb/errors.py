"""The one exception type for user errors: the CLI prints it as one line, no traceback."""


class FembError(Exception):
    """Bad input from the user (a file, key or parameter), as opposed to a bug in femb."""

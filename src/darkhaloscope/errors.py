"""One exception type for bad input: the CLI prints it as a single line and exits 2."""


class DHSError(Exception):
    """Bad input or an unusable state, described in one line that names the problem."""

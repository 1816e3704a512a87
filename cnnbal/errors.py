"""The one error type for user mistakes (bad files, bad flags)."""


class CnnbalError(Exception):
    """A user-facing error: the message names the file (when there is one) and the problem.

    The CLI prints it as one line on stderr and exits with code 2.
    """

"""User-facing errors.

A :class:`MitosegError` is a problem with the user's input (a config key, a data
file, a checkpoint, an output path). The CLI prints its message as one line on
stderr and exits with status 2; ``--debug`` shows the traceback instead.
Anything else that escapes is a bug in mitoseg and keeps its traceback.
"""


class MitosegError(Exception):
    """An error caused by the user's input; the message names the file or key."""

"""User-facing errors.

A :class:`MitosegError` is a problem with the user's input (a config key, a data
file, a checkpoint, an output path) or with the machine it runs on (a full disk).
The CLI prints its message as one line on stderr and exits with its
``exit_code``, 2 (``--debug`` shows the traceback instead). :class:`TrainingDiverged`
ends training that produced only non-finite steps, with exit status 3.
Anything else that escapes is a bug in mitoseg and keeps its traceback. :class:`Terminated` is SIGTERM (what
schedulers such as SLURM and Kubernetes send before SIGKILL), handled like Ctrl-C: the work in progress stops,
temporaries are removed (training first saves ``last.pt``), exit status 143.
"""


class MitosegError(Exception):
    """An error caused by the user's input; the message names the file or key."""

    exit_code = 2


class TrainingDiverged(MitosegError):
    """Training stopped after ``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient
    (each skipped), or because the weights became non-finite; no checkpoint of such weights is written."""

    exit_code = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C would raise KeyboardInterrupt, so that every cleanup of
    an interrupt runs for it too; the CLI exits with status 143 (128 + 15)."""

    exit_code = 143


def raise_terminated(signum, frame) -> None:
    """The SIGTERM handler of the CLI (``signal.signal(signal.SIGTERM, raise_terminated)``)."""
    raise Terminated()

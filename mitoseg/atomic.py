"""Writing files so that a failure never leaves a partial output or a stray temporary behind.

Every output (a checkpoint, a volume, a JSON report, a run's logs) is written to a hidden sibling
``.NAME.tmp-PID`` and renamed over ``NAME`` once complete, so a crash, a full disk or ``kill -9`` leaves
the previous ``NAME`` as it was. The temporary is deleted on every failure this process sees; one left by
a process that was killed outright (its PID no longer alive) is deleted by the next run that writes the
same output (:func:`remove_stale_temporaries`). A full disk becomes one :class:`MitosegError` line that
names the path (:func:`disk_full_error`).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from mitoseg.errors import MitosegError

TMP_MARK = ".tmp-"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def temporary_path(final: str | os.PathLike, pid: int | None = None) -> Path:
    """``DIR/.NAME.tmp-PID``: the temporary that becomes ``DIR/NAME`` (hidden, and owned by a process)."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid() if pid is None else pid}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie (killed, not yet reaped)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's living process
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # "pid (comm) state ...": the state follows the last ')' (comm may hold spaces and parentheses).
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner(name: str, prefix: str) -> int | None:
    """The PID of a temporary named ``prefix + PID``, else None."""
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix):]
    return int(digits) if digits.isdigit() else None


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, a link or a folder (a Zarr store's temporary is a folder); nothing if absent."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Delete the temporaries ``.NAME.tmp-PID`` of the output ``final`` whose process is gone (killed
    while writing it); those of living processes (another run writing the same output) are kept.
    Returns what was removed."""
    final = Path(final)
    prefix = f".{final.name}{TMP_MARK}"
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:  # no folder yet: nothing to clean
        return removed
    for entry in entries:
        pid = _owner(entry.name, prefix)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            remove_path(entry.path)
            removed.append(Path(entry.path))
    return removed


def remove_stale_temporaries_in(folder: str | os.PathLike) -> list[Path]:
    """:func:`remove_stale_temporaries` for every output in ``folder`` (a run directory, which holds only
    mitoseg's own files)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or TMP_MARK not in name:
            continue
        stem, _, digits = name.rpartition(TMP_MARK)
        if stem and digits.isdigit() and int(digits) != os.getpid() and not pid_alive(int(digits)):
            remove_path(entry.path)
            removed.append(Path(entry.path))
    return removed


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The "no space left on device" (or quota) error behind ``exc``, following ``__cause__`` and
    ``__context__`` (torch reports a failed write of its file as a RuntimeError raised while handling
    the OSError); None when there is none."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def disk_full_error(path: str | os.PathLike, kept: str | None = None) -> MitosegError:
    """The one-line error for a write to ``path`` that ran out of space."""
    message = f"no space left on device writing {os.fspath(path)}"
    if kept:
        message += f"; {kept}"
    return MitosegError(message)


def check_output_path(path: str | os.PathLike, what: str) -> None:
    """Refuse an output whose folder cannot exist: one of its parents is a file (``FILE/out.tif``).
    ``what`` names the option in the message."""
    path = Path(os.path.abspath(os.fspath(path)))
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise MitosegError(f"{what} {os.fspath(path)}: {parent} is a file, not a directory")
            return


def make_folder(folder: str | os.PathLike, what: str) -> None:
    """``mkdir -p folder`` with one-line errors (a parent that is a file, no permission, a full disk)."""
    check_output_path(Path(folder) / "x", what)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        if disk_full_cause(exc):
            raise disk_full_error(folder) from exc
        raise MitosegError(f"{what}: cannot create the folder {os.fspath(folder)} ({exc.strerror})") from exc


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], kept: str | None = None) -> None:
    """Write ``path`` through ``write(handle)`` into ``.NAME.tmp-PID``, flushed to disk, then renamed over
    ``path``: the old file stays whole until the new one is complete. On any failure the temporary is
    deleted; a full disk raises :func:`disk_full_error` (``kept``: what the message says is kept)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if disk_full_cause(exc):
            raise disk_full_error(path, kept) from exc
        raise
    finally:
        if os.path.lexists(tmp):
            remove_path(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, kept: str | None = None) -> None:
    """:func:`write_atomic` of a UTF-8 text."""
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data), kept)

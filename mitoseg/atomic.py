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
OLD_MARK = ".old-"  # an output moved aside while its replacement is renamed in (replace_path)
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
    A previous output moved aside by a killed :func:`replace_path` (``.NAME.old-PID``) is put back when
    ``final`` is missing, else removed. Returns what was removed."""
    final = Path(final)
    prefix = f".{final.name}{TMP_MARK}"
    old_prefix = f".{final.name}{OLD_MARK}"
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:  # no folder yet: nothing to clean
        return removed
    for entry in entries:
        pid = _owner(entry.name, prefix)
        old_pid = _owner(entry.name, old_prefix)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            remove_path(entry.path)
            removed.append(Path(entry.path))
        elif old_pid is not None and old_pid != os.getpid() and not pid_alive(old_pid):
            # A replacement killed between its two renames: the old output comes back if nothing took its place.
            if os.path.lexists(final):
                remove_path(entry.path)
            else:
                os.replace(entry.path, final)
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


def _chain(exc: BaseException | None):
    """``exc`` and the exceptions behind it (``__cause__``, else ``__context__``), at most 20."""
    for _ in range(20):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The "no space left on device" (or quota) error behind ``exc``, following ``__cause__`` and
    ``__context__`` (torch reports a failed write of its file as a RuntimeError raised while handling
    the OSError); None when there is none."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _DISK_FULL), None)


def disk_full_error(path: str | os.PathLike, kept: str | None = None) -> MitosegError:
    """The one-line error for a write to ``path`` that ran out of space."""
    message = f"no space left on device writing {os.fspath(path)}"
    if kept:
        message += f"; {kept}"
    return MitosegError(message)


_OS_CAUSES = {errno.EROFS: "a read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path under a file",
              errno.ENAMETOOLONG: "a name too long", errno.EISDIR: "a directory is in the way"}


def os_error_cause(exc: BaseException | None) -> OSError | None:
    """The file-system error (read-only, permission, a path under a file, a full disk, ...) behind ``exc``,
    following ``__cause__`` and ``__context__`` (libraries re-raise them as their own kinds); None if none."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno is not None), None)


def write_error(path: str | os.PathLike, exc: BaseException, kept: str | None = None) -> MitosegError | None:
    """The one line for a write to ``path`` that failed because of the file system (None: not such a failure):
    a full disk (:func:`disk_full_error`), or any other ``OSError`` with its reason."""
    if disk_full_cause(exc) is not None:
        return disk_full_error(path, kept)
    cause = os_error_cause(exc)
    if cause is None:
        return None
    reason = _OS_CAUSES.get(cause.errno) or cause.strerror or str(cause)
    message = f"{os.fspath(path)}: cannot write ({reason})"
    return MitosegError(message + (f"; {kept}" if kept else ""))


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _nearest_existing(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return None


def check_output_path(path: str | os.PathLike, what: str, size: int | None = None) -> None:
    """The one check of an output before any work: its folder can exist (no parent is a file: ``FILE/out.tif``)
    and can be written (permission, a read-only file system; ``size`` bytes free when the size is known).
    ``what`` names the option in the message."""
    path = Path(os.path.abspath(os.fspath(path)))
    existing = _nearest_existing(path.parent)
    if existing is None:
        return
    if not existing.is_dir():
        raise MitosegError(f"{what} {os.fspath(path)}: {existing} is a file, not a directory")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise MitosegError(f"{what} {os.fspath(path)}: {existing} is on a read-only file system")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MitosegError(f"{what} {os.fspath(path)}: no permission to write in {existing}")
    if os.path.lexists(path) and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise MitosegError(f"{what} {os.fspath(path)}: no permission to write in it")
    if size is not None:
        free = shutil.disk_usage(existing).free
        if free < size:
            raise MitosegError(f"no space left on device for {what} {os.fspath(path)}: {_size(free)} free in "
                               f"{existing}, the output needs about {_size(size)}")


def make_folder(folder: str | os.PathLike, what: str) -> None:
    """``mkdir -p folder`` with one-line errors (a parent that is a file, no permission, a full disk)."""
    check_output_path(Path(folder) / "x", what)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        if disk_full_cause(exc):
            raise disk_full_error(folder) from exc
        reason = _OS_CAUSES.get(exc.errno) or exc.strerror
        raise MitosegError(f"{what}: cannot create the folder {os.fspath(folder)} ({reason})") from exc


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or file system cannot."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return False
    raise OSError(code, os.strerror(code), b)


def replace_path(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished ``tmp`` (a file or a folder: a Zarr store, a bioimage.io package) at ``final``. A file is
    renamed over it; a folder replacing an existing ``final`` is swapped with it in one step where the system
    allows (``final`` is never missing, even for an instant), the old one then deleted from ``tmp``'s place;
    elsewhere the old one is moved aside to ``.NAME.old-PID`` first (a kill between the two renames leaves it
    there, and the next write of ``final`` puts it back or removes it: :func:`remove_stale_temporaries`)."""
    tmp, final = os.fspath(tmp), os.fspath(final)
    if not os.path.lexists(final) or not (os.path.isdir(tmp) or os.path.isdir(final)):
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        remove_path(tmp)  # the old output, now at the temporary's name
        return
    old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}{OLD_MARK}{os.getpid()}")
    remove_path(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    remove_path(old)


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
        error = write_error(path, exc, kept)
        if error is not None:
            raise error from exc
        raise
    finally:
        if os.path.lexists(tmp):
            remove_path(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, kept: str | None = None) -> None:
    """:func:`write_atomic` of a UTF-8 text."""
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data), kept)

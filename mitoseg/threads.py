"""How many CPU threads PyTorch uses: ``--threads N``, ``MITOSEG_THREADS``, ``OMP_NUM_THREADS``, or the
physical cores this process may run on.

PyTorch's own default is every core of the machine, whatever share of it the process has (a container's
CPU quota, ``taskset``, a batch scheduler's allocation), and hyper-threads count for nothing in its
convolutions: more threads than cores make every step slower, not faster. mitoseg's default is therefore
the physical cores among the CPUs the process is allowed on (``os.sched_getaffinity``), capped by a cgroup
CPU quota. On a machine shared with other jobs pass fewer (``--threads 1`` on two cores busy with another
job ran about 4x faster per iteration than two threads).

Nothing here imports torch until :func:`apply_threads` is called, after the arguments are checked.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mitoseg.errors import MitosegError

ENV = "MITOSEG_THREADS"


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int]) -> int:
    """Distinct (package, core) pairs among ``cpus`` (hyper-thread siblings count once); ``len(cpus)``
    when the topology is not readable (not Linux)."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


def cgroup_cpu_limit() -> float | None:
    """The CPU quota of the process's cgroup in CPUs (``cpu.max`` of cgroup v2, ``cfs_quota_us`` of v1),
    or None when there is none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """Physical cores among the allowed CPUs, at most the cgroup quota (rounded up), at least 1."""
    count = physical_cores(allowed_cpus())
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def _parse(text: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise MitosegError(f"{where} must be a whole number of threads, got {text!r}") from None
    if value < 1:
        raise MitosegError(f"{where} must be at least 1, got {value}")
    return value


def resolve_threads(option: int | None = None, environ=None) -> tuple[int, str]:
    """The thread count and where it came from: ``--threads``, then ``MITOSEG_THREADS``, then
    ``OMP_NUM_THREADS`` (which PyTorch reads too), then :func:`default_threads`."""
    environ = os.environ if environ is None else environ
    if option is not None:
        return _parse(str(option), "--threads"), "--threads"
    for name in (ENV, "OMP_NUM_THREADS"):
        text = environ.get(name, "").strip()
        if text:
            return _parse(text, name), name
    return default_threads(), "physical cores available"


def apply_threads(count: int) -> None:
    """Set PyTorch's intra-op threads (the one knob that matters for convolutions on the CPU)."""
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)

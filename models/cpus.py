"""How many CPUs this process may really use: in a container, fewer than ``os.cpu_count()`` says.

``os.cpu_count()`` counts the host's CPUs. A container limited with ``docker run --cpus 2`` (a CFS quota
in its cgroup) or pinned with ``--cpuset-cpus`` sees all of them, and torch sized for 64 threads on 2
CPUs' worth of time spends the step waiting for its own threads. The engine sizes torch from this.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs allowed by the cgroup's CFS quota, rounded up; None when there is no quota."""
    v2 = _read(root / "cpu.max")  # cgroup v2: "max 100000" or "200000 100000"
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    quota_v1 = _read(root / "cpu" / "cpu.cfs_quota_us") or _read(root / "cpu.cfs_quota_us")
    period_v1 = _read(root / "cpu" / "cpu.cfs_period_us") or _read(root / "cpu.cfs_period_us")
    try:
        quota, period = int(quota_v1 or "-1"), int(period_v1 or "0")
    except ValueError:
        return None
    if quota > 0 and period > 0:
        return max(1, math.ceil(quota / period))
    return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (affinity), capped by the cgroup's quota."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        allowed = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    return min(allowed, limit) if limit is not None else allowed

"""How many CPUs this process may really use: in a container, fewer than ``os.cpu_count()`` says.

``os.cpu_count()`` counts the host's CPUs. A container limited with ``docker run --cpus 2`` (a CFS quota
in its cgroup) or pinned with ``--cpuset-cpus`` sees all of them, and torch sized for 64 threads on 2
CPUs' worth of time spends the step waiting for its own threads. The engine sizes torch from this.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
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


@dataclass
class LoadAwareThreads:
    """How many torch threads a step gets, from how many sequences it runs.

    Under gevent the hub (sockets, SSE frames) shares the CPUs with the engine thread. While few streams
    run the hub is nearly idle, and a step bound by reading the weights goes faster on every core; with
    many streams the hub has an event per stream per step to send and keeps one core (``busy``).
    Switching has hysteresis (all cores from ``few`` rows down, back at ``many`` up) so a batch that
    hovers around one size does not flip thread counts every step.
    """

    idle: int  # threads while few rows run: every usable CPU
    busy: int  # threads once many run: what the engine chose (CPUs - 1 by default)
    few: int = 4
    many: int = 8
    current: int = 0

    def threads_for(self, rows: int) -> int:
        if rows <= self.few:
            self.current = self.idle
        elif rows >= self.many or not self.current:
            self.current = self.busy
        return self.current

"""How many CPUs this process may really use: in a container, fewer than ``os.cpu_count()`` says.

``os.cpu_count()`` counts the host's CPUs. A container limited with ``docker run --cpus 2`` (a CFS quota
in its cgroup) or pinned with ``--cpuset-cpus`` sees all of them, and torch sized for 64 threads on 2
CPUs' worth of time spends the step waiting for its own threads. The engine sizes torch from this.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
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
class _Bucket:
    """One batch-size range's measurements: seconds per row of a step, per thread count."""

    best: int
    seconds: dict[int, float] = field(default_factory=dict)
    steps: int = 0
    probe_every: int = 0
    probing: int | None = None
    probe_samples: list[float] = field(default_factory=list)


@dataclass
class LoadAwareThreads:
    """How many torch threads a decode step gets: measured per batch size, not guessed.

    Under gevent the hub (sockets, SSE frames) shares the CPUs with the engine thread. While few streams
    run the hub is nearly idle, and a step bound by reading the weights goes faster on every core
    (``idle`` threads); with many streams the hub has an event per stream per step, so the prior is one
    core less (``busy``). But every core only pays on cores that are really free: on a machine shared
    with other busy processes, OpenMP threads wait for each other at every op and a step can take ten
    times longer. So the runner times its steps, and each batch-size range (1, 2-3, 4-7, ...) keeps the
    thread count that measured fastest, trying the other one for a few steps now and then, four times
    less often each time it loses (the cost of a bad try soon falls under a per cent). A new range starts
    from what the nearest measured one found.
    """

    idle: int  # every usable CPU
    busy: int  # what the engine chose (CPUs - 1 by default)
    few: int = 4  # up to this many rows the first guess is ``idle``
    probe_steps: int = 3  # steps a try lasts; its first is not counted (threads wake up)
    first_probe: int = 4  # steps before the first try of the other count
    max_probe_every: int = 4096
    hopeless: float = 4.0  # a try's step this many times slower than the kept count's ends the try
    buckets: dict[int, _Bucket] = field(default_factory=dict)

    def _bucket(self, rows: int) -> _Bucket:
        key = rows.bit_length()
        bucket = self.buckets.get(key)
        if bucket is None:
            # What the nearest measured range found says more than the prior: busy cores are busy for
            # every batch size.
            measured = [k for k, b in self.buckets.items() if b.seconds]
            nearest = min(measured, key=lambda k: abs(k - key), default=None)
            best = self.buckets[nearest].best if nearest is not None else (
                self.idle if rows <= self.few else self.busy)
            bucket = self.buckets[key] = _Bucket(best=best, probe_every=self.first_probe)
        return bucket

    def threads_for(self, rows: int) -> int:
        """Threads for the next step of ``rows`` rows (a try of the other count, now and then)."""
        bucket = self._bucket(rows)
        if self.idle == self.busy:
            return bucket.best
        if bucket.probing is None and bucket.steps >= bucket.probe_every:
            bucket.probing = self.busy if bucket.best == self.idle else self.idle
            bucket.probe_samples = []
        return bucket.probing if bucket.probing is not None else bucket.best

    def prefill_threads(self, rows: int) -> int:
        """Threads for a prefill while ``rows`` rows run: their range's best, no try (an idle runner goes
        by batch 1's: it tells whether the cores are really free)."""
        return self._bucket(max(rows, 1)).best

    def record(self, rows: int, threads: int, seconds: float) -> None:
        """The step ``threads_for(rows)`` chose took ``seconds``."""
        bucket = self._bucket(rows)
        per_row = seconds / max(rows, 1)
        if bucket.probing is None or threads != bucket.probing:
            bucket.steps += 1
            old = bucket.seconds.get(threads)
            bucket.seconds[threads] = per_row if old is None else 0.8 * old + 0.2 * per_row
            return
        bucket.probe_samples.append(per_row)
        current = bucket.seconds.get(bucket.best, float("inf"))
        # A first step several times slower is no wake-up cost: the cores are busy, end the try now.
        hopeless = per_row > self.hopeless * current
        if len(bucket.probe_samples) < self.probe_steps and not hopeless:
            return
        tried = min(bucket.probe_samples[1:], default=float("inf"))
        bucket.steps, bucket.probing = 0, None
        if tried < current:
            bucket.seconds[threads] = tried
            bucket.best, bucket.probe_every = threads, self.first_probe
        else:
            bucket.probe_every = min(4 * bucket.probe_every, self.max_probe_every)

"""The gunicorn master's side of Prometheus' multiprocess mode (see service/metrics.py).

The master prepares ``PROMETHEUS_MULTIPROC_DIR`` before it forks any worker (workers inherit the
variable, and prometheus_client reads it when a worker first imports it), and tells prometheus_client
when a worker has died so its live gauges stop counting. No heavy imports: prometheus_client is imported
only once the variable is set.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_TEMP_PREFIX = "rivulet-metrics-"


def prepare(environ: MutableMapping[str, str] | None = None) -> tuple[Path, bool]:
    """Make the directory ready: the one PROMETHEUS_MULTIPROC_DIR names, emptied of a previous run's
    files (dead pids' counters would otherwise be added to this run's), or a new temporary one, exported.
    -> (the directory, whether it was created here and should be removed at exit)."""
    environ = os.environ if environ is None else environ
    named = environ.get(MULTIPROC_DIR_ENV, "").strip()
    if not named:
        path = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
        environ[MULTIPROC_DIR_ENV] = str(path)
        return path, True
    path = Path(named)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path, False


def remove(path: Path) -> None:
    """At the master's exit: drop a directory ``prepare`` created."""
    shutil.rmtree(path, ignore_errors=True)


def mark_worker_dead(pid: int) -> None:
    """A worker has exited: its running/waiting/open-stream gauges no longer count (its counters do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)

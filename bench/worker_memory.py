"""The memory of a gunicorn worker, read from /proc (Linux): find the worker as the master's child, read
its resident set size. The benches measure per-stream cost and leaks with it."""
from __future__ import annotations

import time
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB


def worker_pid(master_pid: int, timeout: float = 10.0) -> int:
    """The pid of the master's only worker (Rivulet runs one per device). Waits for it to be forked."""
    children_file = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    deadline = time.monotonic() + timeout
    while True:
        children = children_file.read_text().split()
        if len(children) == 1:
            return int(children[0])
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn master {master_pid} has {len(children)} workers, expected one")
        time.sleep(0.1)


def rss_bytes(pid: int) -> int:
    """The process's resident set size now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise RuntimeError(f"unexpected VmRSS unit {unit!r} in /proc/{pid}/status")
            return int(value) * KiB
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")

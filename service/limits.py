"""Process limits a server with thousands of open streams needs. No heavy imports: the gunicorn master
calls this before it forks, and must not import the app, torch or gevent."""
from __future__ import annotations

import resource

# Descriptors a worker needs besides its connections: model files, logs, the engine's, gunicorn's own.
SPARE_FILES = 256


def raise_open_files_limit(connections: int) -> tuple[int, int]:
    """Lift the soft limit on open files so ``connections`` streams fit (each is a socket). Containers
    often start with a soft limit of 1024, and then the 1,025th stream fails to be accepted. Never
    lowers it; cannot pass the hard limit. -> (soft limit before, soft limit now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FILES
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target
    return soft, soft

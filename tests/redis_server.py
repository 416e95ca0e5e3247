"""Start a real ``redis-server`` (Debian's package) on a free loopback port, for the tests of the Redis store.

No persistence (``--save ''``, no AOF): every start is an empty server. A machine without redis-server
skips those tests (``missing_tool``: they fail under CI=true, where .ci/run installs it).
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.live_server import free_port, stop_process


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass
class RedisServer:
    port: int
    log_dir: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"redis-{self.port}.log"

    def start(self) -> None:
        """Run redis-server on this port until it answers PING (again, after ``stop``: a restart)."""
        import redis

        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.log_dir), "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        try:
            while True:
                if self.proc.poll() is not None:
                    log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)


@contextlib.contextmanager
def redis_server(log_dir: Path) -> Iterator[RedisServer]:
    """redis-server on 127.0.0.1:<a free port>, stopped at the end."""
    server = RedisServer(free_port(), log_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()

"""Start a real ``redis-server`` (Debian's package) on a free loopback port, for the tests of the Redis store.

No persistence (``--save ''``, no AOF): every test run starts from an empty server. A machine without
redis-server skips those tests (``missing_tool``: they fail under CI=true, where .ci/run installs it).
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.live_server import free_port


@dataclass
class RedisServer:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@contextlib.contextmanager
def redis_server(log_dir: Path, *, port: int | None = None) -> Iterator[RedisServer]:
    """redis-server on 127.0.0.1:<port> (a free one unless given: a restart reuses its port), until it
    answers PING."""
    import redis

    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = port or free_port()
    log_path = log_dir / f"redis-{port}.log"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(log_dir), "--logfile", str(log_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, proc, log_path)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace') if log_path.exists() else ''}")
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield server
    finally:
        server.stop()

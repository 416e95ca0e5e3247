"""Start the real server (gunicorn + gevent worker, exactly as users run it) on a free loopback port."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import requests

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).parent / "gunicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send ``sig`` to a server still running, wait ``timeout`` for it to exit, else kill it. -> its code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.proc, sig, timeout)


@contextlib.contextmanager
def live_server(env: dict[str, str] | None = None, *, log_dir: Path, ready_timeout: float = 120,
                extra_args: tuple[str, ...] = (), preexec_fn: Callable[[], None] | None = None,
                ready_status: int = 200) -> Iterator[LiveServer]:
    """Run ``gunicorn -c gunicorn.conf.py wsgi:app`` on 127.0.0.1:<free port> until /ready says
    ``ready_status`` (200; 503 for a server expected to refuse its model).
    ``preexec_fn`` runs in the child before gunicorn starts (e.g. to set a process limit)."""
    port = free_port()
    log_path = log_dir / f"gunicorn-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [GUNICORN, "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}", *extra_args, "wsgi:app"],
            cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{server.log()}")
            try:
                if requests.get(server.url + "/ready", timeout=2).status_code == ready_status:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still booting
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        server.stop()

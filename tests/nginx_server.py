"""Run a real ``nginx`` (Debian's package) with deploy/nginx.conf in front of replicas on loopback ports.

deploy/nginx.conf is the snippet users mount into nginx's conf.d; here it is used as written, except
its upstream ``server`` lines (the replicas' addresses) and its ``listen`` port, and it is wrapped in a
main configuration of our own: ``daemon off;`` (nginx stays our child, stopped by its pid), and every
path (pid, logs, temporary files) under the test's directory.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.live_server import ROOT, free_port, stop_process

DEPLOY_CONF = ROOT / "deploy" / "nginx.conf"
_UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+\S+:8080\b([^;]*);\n", re.M)
_LISTEN = re.compile(r"^(\s*)listen\s+80;", re.M)


@dataclass
class NginxServer:
    url: str
    proc: subprocess.Popen
    error_log: Path

    def log(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)  # SIGTERM: nginx's fast shutdown


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def site_config(upstreams: list[str], port: int) -> str:
    """deploy/nginx.conf with its upstream servers replaced by ``upstreams`` (host:port) and its listen
    port by ``port`` on the loopback interface."""
    text = DEPLOY_CONF.read_text()
    first = _UPSTREAM_SERVER.search(text)
    if first is None or not _LISTEN.search(text):
        raise ValueError(f"{DEPLOY_CONF} has no upstream 'server ...:8080' line or no 'listen 80;'")
    indent, parameters = first.groups()  # the first server line's parameters apply to every replica
    ours = "".join(f"{indent}server {address}{parameters};\n" for address in upstreams)
    text = text[:first.start()] + ours + _UPSTREAM_SERVER.sub("", text[first.start():])
    return _LISTEN.sub(rf"\g<1>listen 127.0.0.1:{port};", text)


def main_config(workdir: Path, site: Path) -> str:
    temp = workdir / "temp"
    # Running as root (CI), nginx's workers would switch to "nobody", which cannot enter the test's
    # private directory: keep them as the current user.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
worker_processes 1;
pid {workdir / 'nginx.pid'};
error_log {workdir / 'error.log'} info;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir / 'access.log'};
    client_body_temp_path {temp / 'body'};
    proxy_temp_path {temp / 'proxy'};
    fastcgi_temp_path {temp / 'fastcgi'};
    uwsgi_temp_path {temp / 'uwsgi'};
    scgi_temp_path {temp / 'scgi'};
    include {site};
}}
"""


@contextlib.contextmanager
def nginx_server(upstreams: list[str], workdir: Path) -> Iterator[NginxServer]:
    """nginx on 127.0.0.1:<free port> proxying to ``upstreams``, until it answers /health."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "temp").mkdir(exist_ok=True)
    site = workdir / "rivulet.conf"
    site.write_text(site_config(upstreams, port))
    conf = workdir / "nginx.conf"
    conf.write_text(main_config(workdir, site))
    error_log = workdir / "error.log"
    proc = subprocess.Popen([binary, "-p", str(workdir), "-e", str(error_log), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = NginxServer(f"http://127.0.0.1:{port}", proc, error_log)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {proc.returncode}:\n{server.log()}")
            try:
                if requests.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx not answering after 20s:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        server.stop()

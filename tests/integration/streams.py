"""Helpers for tests against a live server: raw-socket streams (to hang up at will) and /metrics reads."""
from __future__ import annotations

import json
import re
import socket
import time
from urllib.parse import urlsplit

import requests


def metric(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def wait_for_metric(server, name: str, value: float, timeout: float = 10.0) -> float:
    """Poll /metrics until ``name`` equals ``value`` (or the wait runs out). -> the last value seen."""
    deadline = time.monotonic() + timeout
    while (current := metric(server, name)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return current


def send_request(server, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    url = urlsplit(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
                 + b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def read_until(sock: socket.socket, marker: bytes, count: int = 1) -> bytes:
    """Read until ``marker`` has arrived ``count`` times (the body is chunked: markers must fit in one write)."""
    received = b""
    while received.count(marker) < count:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before sending {marker!r}"
        received += chunk
    return received


def open_stream(server, body: dict, path: str = "/v1/chat/completions", until: bytes = b'"content"') -> socket.socket:
    """Start a stream on a raw socket and read until ``until`` (default: its first token) has arrived."""
    sock = send_request(server, path, body)
    read_until(sock, until)
    return sock


def request_log(server) -> list[dict]:
    """The server's structured request lines, parsed."""
    return [json.loads(line.split("] ", 3)[-1]) for line in server.log().splitlines() if '"event":"request"' in line]

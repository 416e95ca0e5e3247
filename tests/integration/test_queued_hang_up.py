"""A client that hangs up while its stream is still queued is cancelled at once, not at its next heartbeat.

A queued stream has nothing to write until its heartbeat (here 60 s), so a failed write cannot tell
that its client left; the worker's event loop watches the socket and sees the close itself.
"""
from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx

from tests.live_server import live_server
from tests.integration.long_model import ENDLESS_TOKENS, long_context_demo

WAIT_S = 30  # far below the 60 s heartbeat: a cancel seen within it was not the heartbeat's doing


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=WAIT_S).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def open_stream(url: str, body: bytes) -> socket.socket:
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=WAIT_S)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_queued_stream_whose_client_leaves_is_cancelled_before_any_heartbeat(tmp_path):
    env = {"RIVULET_MODEL": str(long_context_demo(tmp_path / "model")), "RIVULET_MAX_BATCH": "1",
           "RIVULET_HEARTBEAT_S": "60", "RIVULET_DEVICE": "cpu"}
    body = b'{"prompt": "Once upon a time", "max_tokens": %d, "ignore_eos": true, "stream": true}' % ENDLESS_TOKENS
    with live_server(env, log_dir=tmp_path) as server, \
            open_stream(server.url, body) as running:  # holds the only batch slot for the whole test
        url = server.url
        wait_until(lambda: metric(url, "rivulet_requests_running") == 1, "the first stream to run")
        with open_stream(url, body):
            wait_until(lambda: metric(url, "rivulet_requests_waiting") == 1, "the second stream to queue")
        began = time.monotonic()  # the queued client has closed its connection
        wait_until(lambda: metric(url, "rivulet_requests_waiting") == 0, "the queued stream to be dropped")
        assert time.monotonic() - began < WAIT_S
        assert metric(url, "rivulet_requests_cancelled_total") == 1
        assert metric(url, "rivulet_requests_running") == 1  # the running stream is untouched
        running.close()
        wait_until(lambda: metric(url, "rivulet_requests_running") == 0, "the running stream to be dropped")

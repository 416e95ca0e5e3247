"""Limits on the real server: body size (413), a full queue (429), the request timeout, queued hang-ups.

The server decodes one sequence at a time with room for four more in the queue, so a few long requests
fill it; the request timeout is short so that queued requests run out of time. Its model has a long
context and the long requests ask for more tokens than any machine generates within the timeout
(tests/integration/long_model.py), so the one running holds the batch until the test lets it go or the
timeout ends it: how many requests are refused, and how each stream ends, are known in advance.
"""
from __future__ import annotations

import concurrent.futures
import re
import resource
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from httpx_sse import connect_sse

from models.errors import TIMEOUT_MESSAGE
from service.limits import SPARE_FILES

from tests.integration.long_model import ENDLESS_TOKENS, long_context_demo
from tests.integration.streams import metric, open_stream, read_until, send_request, wait_for_metric
from tests.live_server import live_server
from tests.sse_client import DONE, payloads

MiB = 1024 * 1024
LONG = {"messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": ENDLESS_TOKENS,
        "ignore_eos": True, "temperature": 0, "stream": True}
MAX_WAITING = 4
SETTINGS = {"RIVULET_MAX_BATCH": "1", "RIVULET_MAX_WAITING": str(MAX_WAITING), "RIVULET_REQUEST_TIMEOUT_S": "5",
            "RIVULET_HEARTBEAT_S": "0.25"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = long_context_demo(tmp_path_factory.mktemp("long-model"))
    with live_server({**SETTINGS, "RIVULET_MODEL": str(model)}, log_dir=tmp_path_factory.mktemp("limits")) as srv:
        yield srv


@pytest.fixture
def idle(server):
    """Each test starts with an empty engine (the previous one's requests aborted or timed out)."""
    assert wait_for_metric(server, "rivulet_requests_running", 0) == 0
    assert wait_for_metric(server, "rivulet_requests_waiting", 0) == 0
    return server


def test_413_from_content_length_before_the_body_is_sent(idle):
    url = urlsplit(idle.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(13 * MiB).encode() + b"\r\n\r\n")
        head = read_until(sock, b"\r\n\r\n")  # not one byte of the body was sent
    assert head.startswith(b"HTTP/1.1 413 ")


def test_413_for_a_13_mib_body(idle):
    response = requests.post(idle.url + "/v1/chat/completions", data=b"x" * (13 * MiB), timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_413_for_a_chunked_13_mib_body(idle):
    def body():  # a generator body is sent with Transfer-Encoding: chunked, no Content-Length
        for _ in range(13 * 16):
            yield b" " * (MiB // 16)

    response = requests.post(idle.url + "/v1/completions", data=body(), timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert requests.get(idle.url + "/ready", timeout=10).status_code == 200


def test_a_chunked_body_under_the_limit_is_served(idle):
    def body():
        yield b'{"prompt": "hello", '
        yield b'"max_tokens": 2, "ignore_eos": true}'

    response = requests.post(idle.url + "/v1/completions", data=body(), timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def refused_for_a_full_queue(server) -> bool:
    """POST one more LONG request. -> whether it was refused as a full queue (an accepted one is closed
    at once, without reading its stream)."""
    response = requests.post(server.url + "/v1/chat/completions", json=LONG, timeout=10, stream=True)
    if response.status_code != 429:
        response.close()
        return False
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"
    return True


def test_full_queue_is_429_and_a_queued_client_that_leaves_is_dropped(idle):
    running = open_stream(idle, LONG)  # has its first token: it holds the only batch slot to the end
    queued = [open_stream(idle, LONG, until=b"retry:") for _ in range(MAX_WAITING)]  # each one accepted
    try:
        assert wait_for_metric(idle, "rivulet_requests_waiting", MAX_WAITING) == MAX_WAITING
        # One running and MAX_WAITING queued: every further request is refused, none is queued.
        assert [refused_for_a_full_queue(idle) for _ in range(3)] == [True] * 3
        assert metric(idle, "rivulet_requests_waiting") == MAX_WAITING
        # A queued client hangs up: its next heartbeat write fails and its request leaves the queue.
        cancelled = metric(idle, "rivulet_requests_cancelled_total")
        queued.pop().close()
        assert wait_for_metric(idle, "rivulet_requests_cancelled_total", cancelled + 1) == cancelled + 1
        assert wait_for_metric(idle, "rivulet_requests_waiting", MAX_WAITING - 1) == MAX_WAITING - 1
        # Its place, and only its place, is free again.
        queued.append(open_stream(idle, LONG, until=b"retry:"))
        assert wait_for_metric(idle, "rivulet_requests_waiting", MAX_WAITING) == MAX_WAITING
        assert refused_for_a_full_queue(idle)
        assert metric(idle, "rivulet_requests_running") == 1
    finally:
        for sock in [running, *queued]:
            sock.close()


def test_requests_past_the_timeout_end_with_a_timeout_event(idle):
    """One runs, four wait; none can finish its tokens within the timeout, so each of the five, the
    running one and the queued ones alike, ends with the timeout event and [DONE]."""
    def one(_):
        with httpx.Client(timeout=60) as client:
            with connect_sse(client, "POST", idle.url + "/v1/chat/completions", json=LONG) as source:
                return payloads(list(source.iter_sse()))

    with concurrent.futures.ThreadPoolExecutor(1 + MAX_WAITING) as pool:
        first = pool.submit(one, 0)
        assert wait_for_metric(idle, "rivulet_requests_running", 1) == 1  # the others queue behind it
        queued = [pool.submit(one, i) for i in range(MAX_WAITING)]
        streams = [first.result(), *(f.result() for f in queued)]
    timeout = {"error": {"message": TIMEOUT_MESSAGE, "type": "timeout", "code": "request_timeout"}}
    for chunks in streams:
        assert chunks[-2:] == [timeout, DONE]
        assert all("error" not in c and c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    # The timed-out work was dropped: nothing is left running or queued.
    assert wait_for_metric(idle, "rivulet_requests_running", 0) == 0
    assert metric(idle, "rivulet_requests_waiting") == 0


def test_a_queued_stream_pings_while_it_waits(idle):
    running = open_stream(idle, LONG)
    queued = send_request(idle, "/v1/chat/completions", LONG)
    try:
        received = read_until(queued, b": ping\n", count=2)
        assert b'"content"' not in received  # still waiting for the batch slot
    finally:
        running.close()
        queued.close()


def test_a_container_like_open_files_limit_is_lifted_for_the_streams(tmp_path):
    """Started with a soft limit of 512 open files (as containers often start with 1024), the server
    lifts it before forking so that worker_connections streams fit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = 10000 + SPARE_FILES  # gunicorn.conf.py's worker_connections
    if hard != resource.RLIM_INFINITY:
        expected = min(expected, hard)

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    with live_server({}, log_dir=tmp_path, preexec_fn=low_soft_limit) as server:
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        assert re.search(rf"^Max open files\s+{expected}\s", limits, re.M), limits
        assert f"open files limit raised from 512 to {expected}" in server.log()

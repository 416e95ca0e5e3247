"""Clients that hang up mid-stream cost nothing: their requests are aborted and the batch empties.

How soon the engine stopped is measured in tokens, not seconds: an observer stream runs beside the
clients that hang up, in the same batch, and the batch decodes one token of every running request per
step. So the tokens the observer still receives after the others left the batch are steps they did not
run: if they had been left to run to their end (or nearly), the observer would have few or none left.
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import uuid

import httpx
import requests
from httpx_sse import connect_sse

from tests.integration.streams import metric, read_until, request_log, send_request, wait_for_metric
from tests.sse_client import DONE

MAX_TOKENS = 480  # the demo model's context is 512: about as long as a generation can be
LONG = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": MAX_TOKENS,
        "ignore_eos": True, "temperature": 0, "stream": True}
CLIENTS = 8


def observe(server, started: threading.Event) -> list[float]:
    """Stream LONG to its end; -> the monotonic arrival time of each chunk with text. ``started`` is set
    at the first one."""
    arrivals: list[float] = []
    with httpx.Client(timeout=120) as client:
        with connect_sse(client, "POST", server.url + "/v1/chat/completions", json=LONG) as source:
            for event in source.iter_sse():
                if event.data == DONE:
                    return arrivals
                chunk = json.loads(event.data)
                assert "error" not in chunk, chunk
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    arrivals.append(time.monotonic())
                    started.set()
    raise AssertionError("the observer's stream ended without [DONE]")


def wait_until_running(server, count: int, timeout: float = 60.0) -> float:
    """Poll until ``count`` requests run. -> the monotonic time the answer saying so arrived."""
    deadline = time.monotonic() + timeout
    while metric(server, "rivulet_requests_running") != count:
        assert time.monotonic() < deadline, f"never {count} running"
        time.sleep(0.02)
    return time.monotonic()


def hang_up_beside_an_observer(server, socks: list) -> None:
    """Start the observer beside the running ``socks``, close them once it has its first token, and
    check they left the batch with most of the observer's generation still to come."""
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        observer = pool.submit(observe, server, started)
        assert started.wait(60), "the observer never got a token"
        assert metric(server, "rivulet_requests_running") == CLIENTS + 1
        for sock in socks:
            sock.close()
        alone_at = wait_until_running(server, 1)  # only the observer is left in the batch
        arrivals = observer.result(timeout=120)
    still_to_come = sum(1 for t in arrivals if t > alone_at)
    # The hung-up requests joined before the observer, so run to their end they would have left it
    # only a few tokens; stopped at once, it has almost all of its MAX_TOKENS still to generate.
    assert still_to_come > MAX_TOKENS // 2, f"the aborted requests ran on: {still_to_come} tokens were left"
    assert wait_for_metric(server, "rivulet_requests_running", 0) == 0


def logged(server, request_ids: list[str], timeout: float = 10.0) -> list[dict]:
    """The request log lines of ``request_ids`` (written when each response closes: poll for them)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in request_log(server) if line["request_id"] in request_ids]
        if len(lines) == len(request_ids) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def assert_cancelled_early(server, request_ids: list[str], status: int) -> None:
    lines = logged(server, request_ids)
    assert len(lines) == len(request_ids)
    for line in lines:
        assert (line["status"], line["finish_reason"]) == (status, "cancelled")
        # Noticed at the next token, not near the end of the generation.
        assert line["completion_tokens"] < MAX_TOKENS // 4, line


def test_eight_clients_hang_up_mid_stream(demo_server):
    assert wait_for_metric(demo_server, "rivulet_requests_running", 0) == 0  # the batch is ours alone
    cancelled_before = metric(demo_server, "rivulet_requests_cancelled_total")
    ids = [uuid.uuid4().hex for _ in range(CLIENTS)]
    socks = [send_request(demo_server, "/v1/chat/completions", LONG, {"X-Request-Id": i}) for i in ids]
    for sock in socks:
        read_until(sock, b'"content"')  # its first token: it runs
    assert metric(demo_server, "rivulet_open_streams") == CLIENTS
    hang_up_beside_an_observer(demo_server, socks)
    assert wait_for_metric(demo_server, "rivulet_open_streams", 0) == 0
    cancelled = wait_for_metric(demo_server, "rivulet_requests_cancelled_total", cancelled_before + CLIENTS)
    assert cancelled == cancelled_before + CLIENTS
    assert_cancelled_early(demo_server, ids, 200)
    # And the server goes on serving.
    response = requests.post(demo_server.url + "/v1/chat/completions", timeout=30,
                             json={**LONG, "stream": False, "max_tokens": 4})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4


def test_non_streaming_clients_that_hang_up_are_cancelled_too(demo_server):
    """A non-streaming request writes nothing until its end, so no failed write reveals a gone client:
    the server looks at the socket itself, and the work stops at the next token."""
    assert wait_for_metric(demo_server, "rivulet_requests_running", 0) == 0
    cancelled_before = metric(demo_server, "rivulet_requests_cancelled_total")
    ids = [uuid.uuid4().hex for _ in range(CLIENTS)]
    socks = [send_request(demo_server, "/v1/chat/completions", {**LONG, "stream": False}, {"X-Request-Id": i})
             for i in ids]
    wait_until_running(demo_server, CLIENTS)
    hang_up_beside_an_observer(demo_server, socks)
    cancelled = wait_for_metric(demo_server, "rivulet_requests_cancelled_total", cancelled_before + CLIENTS)
    assert cancelled == cancelled_before + CLIENTS
    assert_cancelled_early(demo_server, ids, 499)


def test_clients_that_pipelined_a_request_and_hang_up_are_cancelled_too(demo_server):
    """A stream's socket is watched by the event loop, which sees a close at once; a pipelined request
    makes it readable first, so the loop looks once and stops watching, and its bytes hide the close from
    the probe too. Those streams must still be cancelled within a few tokens, by the failing writes."""
    assert wait_for_metric(demo_server, "rivulet_requests_running", 0) == 0
    cancelled_before = metric(demo_server, "rivulet_requests_cancelled_total")
    ids = [uuid.uuid4().hex for _ in range(CLIENTS)]
    socks = [send_request(demo_server, "/v1/chat/completions", LONG, {"X-Request-Id": i}) for i in ids]
    for sock in socks:
        read_until(sock, b'"content"')  # its body is read: what follows stays in the socket
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    hang_up_beside_an_observer(demo_server, socks)
    cancelled = wait_for_metric(demo_server, "rivulet_requests_cancelled_total", cancelled_before + CLIENTS)
    assert cancelled == cancelled_before + CLIENTS
    assert_cancelled_early(demo_server, ids, 200)

"""Clients that hang up mid-stream cost nothing: their requests are aborted and the batch empties."""
from __future__ import annotations

import requests

from tests.integration.streams import metric, open_stream, request_log, send_request, wait_for_metric

LONG = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 480, "ignore_eos": True,
        "temperature": 0, "stream": True}


def test_eight_clients_hang_up_mid_stream(demo_server):
    cancelled_before = metric(demo_server, "rivulet_requests_cancelled_total")
    generated_before = metric(demo_server, "rivulet_generated_tokens_total")
    socks = [open_stream(demo_server, LONG) for _ in range(8)]
    assert metric(demo_server, "rivulet_requests_running") > 0
    assert metric(demo_server, "rivulet_open_streams") == 8
    for sock in socks:
        sock.close()
    assert wait_for_metric(demo_server, "rivulet_requests_running", 0) == 0
    assert wait_for_metric(demo_server, "rivulet_open_streams", 0) == 0
    cancelled = wait_for_metric(demo_server, "rivulet_requests_cancelled_total", cancelled_before + 8)
    assert cancelled == cancelled_before + 8
    # Aborted, not run to the end: far fewer tokens than 8 full generations.
    assert metric(demo_server, "rivulet_generated_tokens_total") - generated_before < 8 * 480
    assert sum(1 for line in request_log(demo_server) if line["finish_reason"] == "cancelled") >= 8
    # And the server goes on serving.
    response = requests.post(demo_server.url + "/v1/chat/completions", timeout=30,
                             json={**LONG, "stream": False, "max_tokens": 4})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4


def test_non_streaming_clients_that_hang_up_are_cancelled_too(demo_server):
    """A non-streaming request writes nothing until its end, so no failed write reveals a gone client:
    the server looks at the socket itself, and the work stops at the next token."""
    cancelled_before = metric(demo_server, "rivulet_requests_cancelled_total")
    generated_before = metric(demo_server, "rivulet_generated_tokens_total")
    socks = [send_request(demo_server, "/v1/chat/completions", {**LONG, "stream": False}) for _ in range(8)]
    assert wait_for_metric(demo_server, "rivulet_requests_running", 8) == 8
    for sock in socks:
        sock.close()
    assert wait_for_metric(demo_server, "rivulet_requests_running", 0) == 0
    cancelled = wait_for_metric(demo_server, "rivulet_requests_cancelled_total", cancelled_before + 8)
    assert cancelled == cancelled_before + 8
    assert metric(demo_server, "rivulet_generated_tokens_total") - generated_before < 8 * 480
    gone = [line for line in request_log(demo_server) if line["status"] == 499]
    assert len(gone) >= 8 and all(line["finish_reason"] == "cancelled" for line in gone)

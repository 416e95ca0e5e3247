"""The OpenAI routes and /v1/sse against the real server (gunicorn + gevent worker + engine thread).

One demo server serves the whole session (tests/conftest.py). The demo model's exact words are not
asserted (it is retrained); formats, counts and consistency are.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from httpx_sse import connect_sse

from tests.integration.streams import request_log
from tests.sse_client import DONE, chat_text, completion_text, payloads

SEED_BODY = {"model": "test", "messages": [{"role": "user", "content": "你是谁?"}], "max_tokens": 100, "top_k": -1,
             "top_p": 1, "temperature": 0, "ignore_eos": False, "stream": False}
CHAT = {"model": "test", "messages": [{"role": "user", "content": "Tell me about rivers."}], "temperature": 0}


def stream(url: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, list]:
    """POST ``body`` and read the whole event stream. -> (response, events)."""
    with httpx.Client(timeout=60) as client:
        with connect_sse(client, "POST", url, json=body, headers=dict(headers or {})) as source:
            events = list(source.iter_sse())
            return source.response, events


def test_seed_body_streams_on_sse(demo_server):
    response, events = stream(demo_server.url + "/v1/sse", SEED_BODY)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream;charset=UTF-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert events[0].retry is not None
    chunks = payloads(events)
    assert chunks[-1] == DONE and DONE not in chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "demo" for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    usage_free = [c for c in chunks[:-1] if "usage" in c]
    assert usage_free == []  # include_usage was not asked for


def test_chat_streaming_and_not_agree(demo_server):
    body = {**CHAT, "max_tokens": 16, "ignore_eos": True}
    whole = requests.post(demo_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert whole.status_code == 200 and whole.headers["content-type"] == "application/json"
    _, events = stream(demo_server.url + "/v1/chat/completions",
                       {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = payloads(events)
    data = whole.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    assert data["choices"][0]["message"]["content"] == chat_text(chunks)
    assert data["usage"]["completion_tokens"] == 16
    assert chunks[-2]["usage"] == data["usage"] and chunks[-2]["choices"] == []
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-2])


def test_completions_streaming_and_not_agree(demo_server):
    body = {"model": "x", "prompt": "The river", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    whole = requests.post(demo_server.url + "/v1/completions", json=body, timeout=60).json()
    _, events = stream(demo_server.url + "/v1/completions", {**body, "stream": True})
    chunks = payloads(events)
    assert whole["object"] == "text_completion" and whole["usage"]["completion_tokens"] == 10
    assert whole["choices"][0]["text"] == completion_text(chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_text(demo_server):
    first = requests.post(demo_server.url + "/v1/completions", timeout=60, json={
        "prompt": "The river", "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()
    text = first["choices"][0]["text"]
    # Two visible characters from the second half of the greedy text: the stop must cut it short.
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].strip())
    stopped = requests.post(demo_server.url + "/v1/completions", timeout=60, json={
        "prompt": "The river", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": [stop]}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == text[:text.index(stop)]


def test_tokens_arrive_as_separate_reads(demo_server):
    """Read the raw socket: tokens come in many reads as they are generated, not in one burst at the end."""
    url = urlsplit(demo_server.url)
    body = json.dumps({**CHAT, "max_tokens": 24, "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        reads = []
        while chunk := sock.recv(65536):
            reads.append(chunk)
    with_tokens = [r for r in reads if b'"content"' in r]
    assert b"[DONE]" in reads[-1] or b"[DONE]" in reads[-2]
    assert len(with_tokens) > 1, "every token arrived in a single read"
    assert b"[DONE]" not in with_tokens[0]  # the first token was sent before the generation ended
    assert sum(r.count(b'"content"') for r in reads) == 24


def test_concurrent_greedy_streams_agree(demo_server):
    body = {**CHAT, "max_tokens": 24, "ignore_eos": True, "stream": True}

    def one(_):
        response, events = stream(demo_server.url + "/v1/chat/completions", body)
        chunks = payloads(events)
        assert response.status_code == 200 and chunks[-1] == DONE
        return chat_text(chunks), chunks[-2]["choices"][0]["finish_reason"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert {reason for _, reason in results} == {"length"}
    assert len({text for text, _ in results}) == 1
    alone = requests.post(demo_server.url + "/v1/chat/completions", timeout=60,
                          json={**body, "stream": False}).json()
    assert alone["choices"][0]["message"]["content"] == results[0][0]


BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
    ("/v1/completions", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "top_p": 7}, 400, "top_p"),
    ("/v1/sse", {"inputs": "x"}, 400, "messages"),
    ("/v1/chat/completions", "not json", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(demo_server, path, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(demo_server.url + path, data=data, timeout=30)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert requests.get(demo_server.url + "/ready", timeout=10).status_code == 200


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/nothing-here", 404), ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
])
def test_unknown_routes_and_methods_are_json(demo_server, method, path, status):
    response = requests.request(method, demo_server.url + path, timeout=10)
    assert response.status_code == status and response.json()["error"]["message"]


def test_probes_models_and_metrics(demo_server):
    assert requests.get(demo_server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert requests.get(demo_server.url + "/ready", timeout=10).json()["status"] == "ready"
    models = requests.get(demo_server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "demo"
    text = requests.get(demo_server.url + "/metrics", timeout=10).text
    for name in ("rivulet_requests_running", "rivulet_requests_waiting", "rivulet_requests_total",
                 "rivulet_requests_cancelled_total", "rivulet_time_to_first_token_seconds_bucket",
                 "rivulet_inter_token_latency_seconds_bucket", "rivulet_generated_tokens_total",
                 "rivulet_open_streams"):
        assert re.search(rf"^{name}[ {{]", text, re.M), name
    assert re.search(r'^rivulet_requests_total\{route="/ready",status="200"\} [1-9]', text, re.M)


def test_request_log_line_per_request(demo_server):
    response = requests.post(demo_server.url + "/v1/chat/completions", headers={"X-Request-Id": "trace-42"},
                             json={**CHAT, "max_tokens": 3, "ignore_eos": True}, timeout=30)
    assert response.headers["x-request-id"] == "trace-42"
    # Written once the response is closed, which may be just after the client has read it.
    deadline = time.monotonic() + 10
    while not (lines := [line for line in request_log(demo_server) if line["request_id"] == "trace-42"]):
        assert time.monotonic() < deadline, "no request log line"
        time.sleep(0.05)
    assert len(lines) == 1
    assert lines[0] | {"duration_s": 0, "time_to_first_token_s": 0} == {
        "event": "request", "request_id": "trace-42", "method": "POST", "route": "/v1/chat/completions",
        "status": 200, "prompt_tokens": lines[0]["prompt_tokens"], "completion_tokens": 3,
        "time_to_first_token_s": 0, "duration_s": 0, "finish_reason": "length",
        "auth_method": None, "key_id": None, "auth_outcome": None}  # no authentication configured
    assert lines[0]["prompt_tokens"] > 0

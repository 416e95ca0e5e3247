"""The request pipeline in one process: Flask app, jobs, channel and a real engine thread.

The demo model runs for real here; a backend that never finishes a step stands in for a stuck model
where the route's own safety nets (heartbeats, the timeout) are under test. Behaviour against the real
gunicorn server is in tests/integration.
"""
from __future__ import annotations

import json
import logging
import threading
from types import SimpleNamespace

import gevent
import pytest
import torch

from models.llm_backend import LlamaBackend
from service.jobs import DONE, HEARTBEAT, start_job
from service.lifecycle import watch_worker
from service.settings import DEMO_MODEL_DIR
from tests.sse_client import chat_text, completion_text, events_from_bytes, payloads

CHAT = {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0}


def open_stream(client, path, body, **kwargs):
    response = client.post(path, json=body, buffered=False, **kwargs)
    return response, iter(response.response)


def read_all(client, path, body, **kwargs):
    response, frames = open_stream(client, path, body, **kwargs)
    try:
        return response, b"".join(frames)
    finally:
        response.close()


def sample(runtime, name):
    return runtime.metrics.registry.get_sample_value(name)


def wait_for(condition, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        gevent.sleep(0.02)
    return condition()


@pytest.fixture
def demo(started_app, make_settings):
    return started_app(make_settings(heartbeat_s=1))


class StalledBackend(LlamaBackend):
    """The demo model's tokenizer and context, but a step that produces nothing until ``unblock`` is set."""

    def __init__(self) -> None:
        super().__init__(DEMO_MODEL_DIR, torch.device("cpu"), max_batch=4)
        self.unblock = threading.Event()

    def load(self) -> None:
        pass

    def free_slots(self) -> int:
        return 4

    def execute(self, batch) -> list:
        self.unblock.wait(30)
        return []


@pytest.fixture
def stalled(started_app, make_settings):
    backends = []

    def build(**overrides):
        backend = StalledBackend()
        backends.append(backend)
        return started_app(make_settings(**overrides), backend=backend), backend

    yield build
    for backend in backends:  # before started_app stops the engines
        backend.unblock.set()


def test_chat_stream_format(demo):
    body = {**CHAT, "max_tokens": 6, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    response, raw = read_all(demo.test_client(), "/v1/chat/completions", body, headers={"X-Request-Id": "abc-1"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream;charset=UTF-8"
    assert response.headers["X-Request-Id"] == "abc-1"
    assert raw.startswith(b"retry: ")
    events = events_from_bytes(raw)
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    chunks = payloads(events)
    assert chunks[-1] == DONE
    *text_chunks, final, usage = chunks[:-1]
    assert all(c["id"] == "chatcmpl-abc-1" and c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert text_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 6


def test_streamed_text_equals_non_streamed_text(demo):
    client = demo.test_client()
    body = {**CHAT, "max_tokens": 12, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=body).get_json()
    _, raw = read_all(client, "/v1/chat/completions", {**body, "stream": True})
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["content"] == chat_text(payloads(events_from_bytes(raw)))
    assert whole["usage"]["completion_tokens"] == 12 and whole["choices"][0]["finish_reason"] == "length"


def test_completion_stream_and_whole(demo):
    client = demo.test_client()
    body = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).get_json()
    _, raw = read_all(client, "/v1/completions", {**body, "stream": True})
    chunks = payloads(events_from_bytes(raw))
    assert whole["object"] == "text_completion" and chunks[0]["object"] == "text_completion"
    assert whole["choices"][0]["text"] == completion_text(chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_sse_route_streams_the_modelarts_seed_body(demo):
    body = {"model": "test", "messages": [{"role": "user", "content": "你是谁?"}], "max_tokens": 100, "top_k": -1,
            "top_p": 1, "temperature": 0, "ignore_eos": False, "stream": False}
    response, raw = read_all(demo.test_client(), "/v1/sse", body)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    chunks = payloads(events_from_bytes(raw))
    assert chunks[-1] == DONE
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_prompt_plus_max_tokens_beyond_the_context_is_400(demo):
    response = demo.test_client().post("/v1/chat/completions", json={**CHAT, "max_tokens": 100000})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "context_length_exceeded"
    assert response.get_json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "word " * 2_000_000}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 2_000_000}]}),
])
def test_a_huge_prompt_is_refused_before_it_is_tokenized(demo, path, body):
    response = demo.test_client().post(path, json=body)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in response.get_json()["error"]["message"]


def test_token_id_prompts_are_checked_against_the_vocabulary(demo):
    response = demo.test_client().post("/v1/completions", json={"prompt": [1, 10**6], "max_tokens": 1})
    assert response.status_code == 400 and "vocabulary" in response.get_json()["error"]["message"]


def test_models_names_the_served_model(demo):
    data = demo.test_client().get("/v1/models").get_json()["data"]
    assert [m["id"] for m in data] == ["demo"]


def test_a_client_that_hangs_up_is_cancelled(demo, caplog):
    runtime = demo.extensions["rivulet"]
    body = {**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with caplog.at_level(logging.INFO, logger="rivulet.request"):
        response, frames = open_stream(demo.test_client(), "/v1/chat/completions", body)
        assert next(frames).startswith(b"retry:")
        assert b"data: " in next(frames)
        assert runtime.engine.running_count == 1
        response.close()  # what gunicorn does when a write to the client fails
        assert wait_for(lambda: runtime.engine.running_count == 0)
    assert sample(runtime, "rivulet_requests_cancelled_total") == 1
    assert sample(runtime, "rivulet_open_streams") == 0
    line = json.loads([r.getMessage() for r in caplog.records if r.name == "rivulet.request"][-1])
    assert line["finish_reason"] == "cancelled" and line["status"] == 200 and line["completion_tokens"] < 400


def test_token_metrics_are_written_while_a_stream_runs_and_complete_when_it_ends(demo, monkeypatch):
    """A stream writes its tokens and inter-token gaps every METRICS_FLUSH_S (not per token), and all of
    them by its end: after the stream the counter holds every token, the histogram every gap."""
    runtime = demo.extensions["rivulet"]
    monkeypatch.setattr("service.jobs.METRICS_FLUSH_S", 0.0)  # every token: visible while running
    job = start_job(runtime, "completion", {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
                                            "temperature": 0, "stream": True})
    stream = iter(job)
    for _ in range(4):
        next(stream)
    assert sample(runtime, "rivulet_generated_tokens_total") >= 4
    job.abort()
    rest = [p for p in stream if p is not HEARTBEAT]
    assert rest[-1] == DONE and sample(runtime, "rivulet_generated_tokens_total") == job.completion_tokens

    monkeypatch.setattr("service.jobs.METRICS_FLUSH_S", 3600.0)  # never while running: only at the end
    before = sample(runtime, "rivulet_generated_tokens_total")
    gaps_before = sample(runtime, "rivulet_inter_token_latency_seconds_count")
    body = {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, "temperature": 0, "stream": True}
    job = start_job(runtime, "completion", body)
    texts = [p for p in job if isinstance(p, dict) and p["choices"] and p["choices"][0]["finish_reason"] is None]
    assert sample(runtime, "rivulet_generated_tokens_total") - before == 12
    assert sample(runtime, "rivulet_inter_token_latency_seconds_count") - gaps_before == len(texts) - 1


def test_abort_from_another_greenlet_ends_the_stream_with_cancelled(demo):
    runtime = demo.extensions["rivulet"]
    job = start_job(runtime, "chat", {**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True})
    stream = iter(job)
    first = next(stream)
    assert first["choices"][0]["delta"]["role"] == "assistant"
    gevent.spawn(job.abort)
    rest = [p for p in stream if p is not HEARTBEAT]
    assert rest[-1] == DONE
    assert rest[-2] == {"error": {"message": "the request was cancelled", "type": "cancelled", "code": "cancelled"}}
    assert job.finish_reason == "cancelled"
    assert wait_for(lambda: runtime.engine.running_count == 0)


def test_a_bug_while_streaming_still_ends_the_stream(demo, monkeypatch):
    def broken(self, text):
        raise KeyError("bug")

    monkeypatch.setattr("service.openai_stream.ResponseShape.text_chunk", broken)
    _, raw = read_all(demo.test_client(), "/v1/chat/completions", {**CHAT, "max_tokens": 50, "stream": True})
    chunks = payloads(events_from_bytes(raw))
    assert chunks == [{"error": {"message": "internal server error", "type": "internal_error",
                                 "code": "internal_error"}}, DONE]
    assert wait_for(lambda: demo.extensions["rivulet"].engine.running_count == 0)


def test_quiet_stream_sends_heartbeats(stalled):
    app, _ = stalled(heartbeat_s=0.05)
    response, frames = open_stream(app.test_client(), "/v1/chat/completions", {**CHAT, "stream": True})
    try:
        assert next(frames).startswith(b"retry:")
        assert [next(frames) for _ in range(3)] == [b": ping\n"] * 3
    finally:
        response.close()
    assert sample(app.extensions["rivulet"], "rivulet_requests_cancelled_total") == 1


def test_route_ends_a_stream_the_engine_overran(stalled, monkeypatch):
    monkeypatch.setattr("service.jobs.SAFETY_MARGIN_S", 0.05)
    app, _ = stalled(request_timeout_s=0.1, heartbeat_s=10)
    runtime = app.extensions["rivulet"]
    job = start_job(runtime, "chat", {**CHAT, "stream": True})
    stream = list(job)
    assert stream[-1] == DONE
    assert stream[-2]["error"]["type"] == "timeout" and stream[-2]["error"]["code"] == "request_timeout"
    assert job.ticket.cancel_reason == "timeout"  # the engine's work is dropped too
    assert sample(runtime, "rivulet_requests_cancelled_total") == 0  # a timeout is not a cancel


def test_non_streaming_timeout_is_504(stalled, monkeypatch):
    monkeypatch.setattr("service.jobs.SAFETY_MARGIN_S", 0.05)
    app, _ = stalled(request_timeout_s=0.1)
    response = app.test_client().post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 504 and response.get_json()["error"]["type"] == "timeout"


def test_503_until_the_engine_is_started(client):
    assert client.get("/ready").status_code == 503
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "engine_unavailable"


def test_sigterm_drain_then_shutdown_event(demo):
    """The drain watcher with gunicorn's worker reduced to what it reads: alive, graceful_timeout, pid."""
    runtime = demo.extensions["rivulet"]
    worker = SimpleNamespace(alive=True, pid=0, cfg=SimpleNamespace(graceful_timeout=0.4))
    watch_worker(runtime, worker)
    client = demo.test_client()
    response, frames = open_stream(client, "/v1/chat/completions",
                                   {**CHAT, "max_tokens": 500, "ignore_eos": True, "stream": True})
    assert next(frames).startswith(b"retry:") and b"data: " in next(frames)
    worker.alive = False  # what SIGTERM does
    assert wait_for(lambda: runtime.engine.state != "ready")
    refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 503 and "shutting down" in refused.get_json()["error"]["message"]
    chunks = payloads(events_from_bytes(b"".join(frames)))
    response.close()
    assert chunks[-1] == DONE
    assert chunks[-2]["error"]["type"] == "shutdown"
    assert client.get("/ready").status_code == 503

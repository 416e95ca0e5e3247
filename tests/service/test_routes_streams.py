"""/v1/streams in one process (Flask test client, real engine thread): what needs settings too small or
a model too slow for the shared live server: the total bound's 429, and cancelling a stream nobody reads."""
from __future__ import annotations

import json

import gevent
import gevent.monkey
import torch

from models.llm_backend import LlamaBackend
from service import resumable
from service.settings import DEMO_MODEL_DIR
from tests.sse_client import events_from_bytes

real_sleep = gevent.monkey.get_original("time", "sleep")
CHAT = {"messages": [{"role": "user", "content": "Tell me a fortune."}], "temperature": 0, "max_tokens": 8}


class NeverEndingBackend(LlamaBackend):
    """The demo model's tokenizer, but steps that generate nothing: a stream ends only when cancelled."""

    def __init__(self) -> None:
        super().__init__(DEMO_MODEL_DIR, torch.device("cpu"), max_batch=4)

    def load(self) -> None:
        pass

    def free_slots(self) -> int:
        return 4

    def execute(self, batch) -> list:
        real_sleep(0.01)  # the engine thread's idea of a step; gevent's sleep would need a hub here
        return []


def read_all(client, url: str) -> list:
    response = client.get(url, buffered=False)
    try:
        return events_from_bytes(b"".join(response.response))
    finally:
        response.close()


def wait_for(condition, timeout: float = 30.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        gevent.sleep(0.02)
    return condition()


def test_new_streams_get_429_while_the_replay_buffers_are_full(started_app, make_settings):
    app = started_app(make_settings(device="cpu", stream_total_bytes=1))
    client = app.test_client()
    first = client.post("/v1/streams", json=CHAT)
    assert first.status_code == 201
    read_all(client, first.get_json()["url"])  # the finished stream now holds more than one byte
    refused = client.post("/v1/streams", json=CHAT)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "stream_store_full"
    assert int(refused.headers["Retry-After"]) >= 1
    assert client.delete(first.get_json()["url"]).status_code == 204
    assert client.post("/v1/streams", json=CHAT).status_code == 201


def test_a_stream_nobody_reads_is_cancelled_after_the_grace_time(started_app, make_settings, monkeypatch):
    monkeypatch.setattr(resumable, "SWEEP_INTERVAL_S", 0.05)
    backend = NeverEndingBackend()
    app = started_app(make_settings(device="cpu", stream_reader_grace_s=0.2), backend=backend)
    engine = app.extensions["rivulet"].engine
    client = app.test_client()
    created = client.post("/v1/streams", json=CHAT)
    assert created.status_code == 201
    assert wait_for(lambda: engine.running_count == 1)
    assert wait_for(lambda: engine.running_count == 0), "the unread stream was not cancelled"
    events = read_all(client, created.get_json()["url"])
    assert json.loads(events[-2].data)["error"]["code"] == "cancelled"
    assert (events[-1].event, events[-1].data) == ("done", "[DONE]")


def test_a_connected_reader_keeps_a_quiet_stream_running(started_app, make_settings, monkeypatch):
    monkeypatch.setattr(resumable, "SWEEP_INTERVAL_S", 0.05)
    backend = NeverEndingBackend()
    app = started_app(make_settings(device="cpu", stream_reader_grace_s=0.2, heartbeat_s=0.1),
                      backend=backend)
    engine = app.extensions["rivulet"].engine
    client = app.test_client()
    url = client.post("/v1/streams", json=CHAT).get_json()["url"]
    response = client.get(url, buffered=False)
    frames = iter(response.response)
    pings = 0
    for frame in frames:  # heartbeats for five times the grace time, while the engine produces nothing
        pings += frame.startswith(b": ping")
        if pings == 10:
            break
    assert engine.running_count == 1
    response.close()
    client.delete(url)
    assert wait_for(lambda: engine.running_count == 0)

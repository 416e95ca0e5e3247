"""Redis configured but unreachable (a closed loopback port; no redis-server needed): new resumable
streams get a clear 503, /ready reports the store without turning the replica off, and the setting
accepts only what the store understands."""
from __future__ import annotations

import pytest

from service.settings import SettingsError
from service.stream_store import MemoryStreamStore, StoreBounds, open_store
from tests.live_server import free_port

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture
def unreachable_app(make_settings):
    from service import create_app

    return create_app(make_settings(stream_store=f"redis://:s3cret@127.0.0.1:{free_port()}/0"))


def test_new_resumable_streams_get_503_naming_the_store(unreachable_app):
    answer = unreachable_app.test_client().post("/v1/streams", json=CHAT)
    assert answer.status_code == 503
    error = answer.get_json()["error"]
    assert error["code"] == "stream_store_unavailable" and error["type"] == "service_unavailable"
    assert "Redis at redis://127.0.0.1:" in error["message"] and "s3cret" not in error["message"]


def test_ready_reports_the_unreachable_store(unreachable_app):
    body = unreachable_app.test_client().get("/ready").get_json()
    assert body["stream_store"]["backend"] == "redis" and body["stream_store"]["reachable"] is False
    assert "unreachable" in body["stream_store"]["error"]


def test_ready_reports_the_memory_store(client):
    assert client.get("/ready").get_json()["stream_store"] == {"backend": "memory", "reachable": True}


@pytest.mark.parametrize("value", ["", "memory"])
def test_memory_is_the_default_store(make_settings, value):
    store = open_store(make_settings(stream_store=value).stream_store, StoreBounds())
    assert isinstance(store, MemoryStreamStore)


@pytest.mark.parametrize("value", ["http://redis:6379", "redis", "mem"])
def test_other_store_values_are_refused_at_start_up(value):
    from service.settings import Settings

    with pytest.raises(SettingsError, match="RIVULET_STREAM_STORE"):
        Settings.from_env({"RIVULET_STREAM_STORE": value})

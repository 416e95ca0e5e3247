"""One live server for the browser-facing tests (resumable streams, the demo page, Postman), shared by
the session: auth on (as users run it in front of browsers: an API key, and one AK/SK pair), CORS for one
origin, the test hooks on, and a short retention so expiry can be watched."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.live_server import LiveServer, live_server

API_KEY = "test-key-0123"
ACCESS_KEY, SECRET_KEY = "TESTAK0123", "test-sk-0123456789"
ALLOWED_ORIGIN = "http://allowed.example"
STREAM_RETENTION_S = 5
STREAMS_SERVER_ENV = {
    "RIVULET_API_KEYS": API_KEY,
    "RIVULET_CORS_ORIGINS": ALLOWED_ORIGIN,
    "RIVULET_TEST_HOOKS": "true",
    "RIVULET_STREAM_RETENTION_S": str(STREAM_RETENTION_S),
    "RIVULET_HEARTBEAT_S": "1",
    "RIVULET_DEVICE": "cpu",
}


@pytest.fixture(scope="session")
def streams_server(tmp_path_factory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("streams-server")
    access_keys = folder / "access_keys"
    access_keys.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    os.chmod(access_keys, 0o600)
    env = {**STREAMS_SERVER_ENV, "RIVULET_ACCESS_KEYS": str(access_keys)}
    with live_server(env, log_dir=folder) as server:
        yield server

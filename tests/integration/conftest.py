"""One live server for the browser-facing tests (resumable streams, the demo page, Postman), shared by
the session: auth on (as users run it in front of browsers), CORS for one origin, the test hooks on,
and a short retention so expiry can be watched."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live_server import LiveServer, live_server

API_KEY = "test-key-0123"
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
    with live_server(STREAMS_SERVER_ENV, log_dir=tmp_path_factory.mktemp("streams-server")) as server:
        yield server

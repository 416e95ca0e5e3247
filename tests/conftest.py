"""Fixtures shared by the service tests: settings, in-process apps, and one live demo server per session.

- ``make_settings(**overrides)``: Settings from defaults and overrides only (the environment is ignored).
- ``app`` / ``client``: an app whose engine is NOT started (validation, routing, auth, 503 paths).
- ``started_app``: a factory for apps whose engine thread runs in this process (real channel, real
  engine); every app it makes is stopped at the end of the test.
- ``demo_server``: ``gunicorn -c gunicorn.conf.py wsgi:app`` serving the demo model, shared by the whole
  session (start-up costs a few seconds). Tests that need other settings start their own with
  ``tests.live_server.live_server``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import os

import pytest

from tests.live_server import LiveServer, live_server

# The shared server's settings: defaults, but a short heartbeat so quiet streams ping within a test.
DEMO_SERVER_ENV = {"RIVULET_HEARTBEAT_S": "1"}


def missing_tool(reason: str) -> None:
    """A test needs a tool this machine lacks: skip on a developer's machine, fail in CI (CI=true), where
    .ci/run installs it and a silent skip would hide that the test never ran."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: .ci/run should have installed it)")
    pytest.skip(reason)


# The service is imported inside the fixtures, so the engine's own tests collect even when it is broken.


@pytest.fixture
def make_settings() -> Callable[..., Any]:
    from service.settings import Settings

    return lambda **overrides: Settings.from_env({}, **overrides)


@pytest.fixture
def app(make_settings) -> Any:
    from service import create_app

    return create_app(make_settings())


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def started_app(make_settings) -> Iterator[Callable[..., Any]]:
    started: list[Any] = []

    from service import create_app

    def build(settings: Any = None, *, backend: Any = None, wait_ready: bool = True) -> Any:
        application = create_app(settings or make_settings(), backend=backend)
        runtime = application.extensions["rivulet"]
        runtime.start()
        started.append(runtime)
        if wait_ready:
            _wait_until_ready(runtime)
        return application

    yield build
    for runtime in started:
        runtime.stop()


def _wait_until_ready(runtime, timeout: float = 60.0) -> None:
    import gevent

    for _ in range(int(timeout / 0.05)):
        if runtime.engine.ready:
            return
        if runtime.engine.error:
            raise RuntimeError(f"engine failed: {runtime.engine.error}")
        gevent.sleep(0.05)
    raise RuntimeError("engine not ready in time")


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory) -> Iterator[Any]:
    """A real redis-server on a free loopback port for the session (tests keep apart by key prefix)."""
    from tests.redis_server import redis_server, redis_server_binary

    if redis_server_binary() is None:
        missing_tool("redis-server is not installed (apt-get install redis-server)")
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory) -> Iterator[LiveServer]:
    with live_server(DEMO_SERVER_ENV, log_dir=tmp_path_factory.mktemp("demo-server")) as server:
        yield server

"""Faults: the engine fails loudly, the worker recovers by itself.

- A step that fails as a broken device would (a test hook): every open stream ends with an error event
  and [DONE], /ready turns 503, and gunicorn's fresh worker reloads the model and serves again.
- A model package whose infer never returns: its client's stream still ends on time with a timeout
  event, and the stuck worker is replaced after RIVULET_STEP_TIMEOUT_S.
- A model package that kills the process (a segfault in native code): nothing can end that worker's
  streams properly (they are cut), but gunicorn starts a fresh worker and the service comes back.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from tests.live_server import LiveServer, live_server

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ROOT / "tests" / "fixtures" / "packages"
WAIT_S = 60


def read_stream(server: LiveServer, path: str, body: dict, out: list, started: threading.Event | None = None) -> None:
    """Read one stream's data payloads into ``out``; a cut connection appends "<cut>"."""
    try:
        with httpx.Client(timeout=WAIT_S) as client, connect_sse(client, "POST", server.url + path, json=body) as src:
            for event in src.iter_sse():
                out.append(event.data)
                if started is not None:
                    started.set()
    except (httpx.TransportError, httpx.RemoteProtocolError):
        out.append("<cut>")


def wait_ready_again(server: LiveServer) -> None:
    """/ready answers 200 again (a fresh worker loaded the model)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass  # between the old worker and the new one
        time.sleep(0.2)
    pytest.fail(f"/ready did not come back:\n{server.log()[-3000:]}")


def booted_workers(server: LiveServer) -> int:
    return server.log().count("Booting worker with pid")


def test_an_engine_fault_ends_every_stream_with_an_error_and_the_worker_comes_back(tmp_path):
    env = {"RIVULET_TEST_HOOKS": "true", "RIVULET_MAX_BATCH": "4", "RIVULET_HEARTBEAT_S": "1",
           "RIVULET_DEVICE": "cpu"}
    with live_server(env, log_dir=tmp_path) as server:
        body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
        outs = [[] for _ in range(10)]
        started = [threading.Event() for _ in outs]
        threads = [threading.Thread(target=read_stream, args=(server, "/v1/completions", body, out, ev))
                   for out, ev in zip(outs, started)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + WAIT_S
        while sum(event.is_set() for event in started) < 4:  # four run (the batch); six wait with heartbeats
            assert time.monotonic() < deadline, "the batch never started"
            time.sleep(0.05)
        assert httpx.post(server.url + "/v1/test/engine-fault", timeout=WAIT_S).status_code == 200
        for thread in threads:
            thread.join(WAIT_S)
        for out in outs:
            assert out[-1] == "[DONE]", out[-3:]
            error = json.loads(out[-2])["error"]
            assert error["type"] == "model_error" and "engine failed" in error["message"], error
        assert httpx.get(server.url + "/ready", timeout=5).status_code == 503 or booted_workers(server) >= 2
        wait_ready_again(server)
        assert booted_workers(server) == 2
        answer = httpx.post(server.url + "/v1/completions", timeout=WAIT_S,
                            json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        assert "is replaced: the engine failed: InjectedFault" in server.log()


def test_a_package_that_never_returns_times_out_its_client_and_its_worker_is_replaced(tmp_path):
    env = {"RIVULET_MODEL": str(PACKAGES / "draining"), "RIVULET_DEVICE": "cpu", "RIVULET_HEARTBEAT_S": "1",
           "RIVULET_REQUEST_TIMEOUT_S": "2", "RIVULET_STEP_TIMEOUT_S": "6"}
    with live_server(env, log_dir=tmp_path) as server:
        out: list = []
        began = time.monotonic()
        read_stream(server, "/v1/sse", {"count": 1, "forever": True, "interval_ms": 50}, out)
        took = time.monotonic() - began
        assert out[-1] == "[DONE]" and json.loads(out[-2])["error"]["code"] == "request_timeout"
        assert took < WAIT_S / 2  # ended at its deadline (plus a margin), not when infer returns (never)
        wait_ready_again(server)
        deadline = time.monotonic() + WAIT_S
        while booted_workers(server) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        wait_ready_again(server)
        assert "is replaced: the engine has been inside one step" in server.log()
        # The stuck worker itself is gone (its engine thread would otherwise hold the process forever).
        first_worker = int(re.search(r"Booting worker with pid: (\d+)", server.log()).group(1))
        deadline = time.monotonic() + WAIT_S
        while Path(f"/proc/{first_worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{first_worker}").exists()
        assert "exits with its engine thread still running" in server.log()
        again: list = []
        read_stream(server, "/v1/sse", {"count": 2}, again)
        assert [json.loads(d)["tick"] for d in again[:-1]] == [0, 1] and again[-1] == "[DONE]"


def test_a_package_that_crashes_the_process_gets_a_fresh_worker(tmp_path):
    env = {"RIVULET_MODEL": str(PACKAGES / "misbehaving"), "RIVULET_DEVICE": "cpu"}
    with live_server(env, log_dir=tmp_path) as server:
        out: list = []
        read_stream(server, "/v1/sse", {"mode": "crash"}, out)
        assert "[DONE]" not in out  # the process died mid-stream: its connection is cut, not ended
        wait_ready_again(server)
        again: list = []
        read_stream(server, "/v1/sse", {"mode": "ok", "count": 1}, again)
        assert again == ['{"tick":0}', "[DONE]"]

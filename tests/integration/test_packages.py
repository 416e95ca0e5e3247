"""Model packages under the real server (gunicorn + gevent worker): /v1/sse, /v1/infer, validation, endings.

One server per package, shared by the tests of a module-scoped fixture: starting gunicorn (and torch) is
the slow part on a 2-core machine.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from httpx_sse import connect_sse

from tests.live_server import LiveServer, live_server
from tests.sse_client import payloads

ROOT = Path(__file__).resolve().parents[2]
WORDS = ROOT / "models" / "packages" / "words"
LIFE = ROOT / "models" / "packages" / "life"
INFERLESS = ROOT / "tests" / "fixtures" / "inferless_package"
PACKAGES = ROOT / "tests" / "fixtures" / "packages"
REQUEST_TIMEOUT_S = 4  # the misbehaving server's RIVULET_REQUEST_TIMEOUT_S: its timeout test waits this long
WAIT_S = 30  # bound on waits for things that take milliseconds; never asserted on


def serve(package: Path, tmp_path_factory, **env: str) -> Iterator[LiveServer]:
    log_dir = tmp_path_factory.mktemp(f"server-{package.name}")
    with live_server({"RIVULET_MODEL": str(package), "RIVULET_DEVICE": "cpu", **env}, log_dir=log_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    yield from serve(WORDS, tmp_path_factory)


@pytest.fixture(scope="module")
def package_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("misbehaving") / "package.log"


@pytest.fixture(scope="module")
def misbehaving(tmp_path_factory, package_log):
    yield from serve(PACKAGES / "misbehaving", tmp_path_factory, MISBEHAVING_PACKAGE_LOG=str(package_log),
                     RIVULET_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S), RIVULET_MAX_WAITING="1")


def wait_for_record(path: Path, tag: str) -> str | None:
    deadline = time.monotonic() + WAIT_S
    while recorded(path, tag) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return recorded(path, tag)


def stream(srv: LiveServer, body: Any) -> list[Any]:
    """POST /v1/sse and read the whole stream: each event's data (JSON decoded), [DONE] as a string."""
    with httpx.Client(timeout=WAIT_S) as client, \
            connect_sse(client, "POST", srv.url + "/v1/sse", json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"] == "text/event-stream;charset=UTF-8"
        # httpx-sse dispatches a block that holds only "retry:" as an event with no data; skip such
        events = [e for e in source.iter_sse() if e.data]
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    assert events[-1].data == "[DONE]"
    return payloads(events)


def post(srv: LiveServer, path: str, body: Any) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=WAIT_S)


# --- the words example ------------------------------------------------------------------------------


def test_words_streams_one_event_per_word(words):
    assert stream(words, {"prompt": "streams are fun", "delay_ms": 5}) == [
        {"index": 0, "word": "streams"}, {"index": 1, "word": "are"}, {"index": 2, "word": "fun"}, "[DONE]"]


def test_words_accepts_the_kserve_body_inferless_clients_send(words):
    body = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["hi there"]},
                       {"name": "delay_ms", "shape": [1], "datatype": "INT32", "data": [0]}]}
    assert stream(words, body) == [{"index": 0, "word": "hi"}, {"index": 1, "word": "there"}, "[DONE]"]


@pytest.mark.parametrize("body, param, words_in_message", [
    ({"delay_ms": 5}, "prompt", "input 'prompt' is required"),
    ({"prompt": ["a", "b"], "delay_ms": "5"}, "delay_ms", "must be an integer"),
    ({"prompt": "hi", "temperature": 0.2}, "temperature", "unknown input 'temperature'"),
    ({"inputs": [{"name": "prompt", "shape": [2], "data": ["a", "b"]}]}, "prompt", "shape [1]"),
    ({"inputs": [{"name": "prompt", "datatype": "FP32", "data": [1.5]}]}, "prompt", "declared STRING"),
])
def test_invalid_inputs_get_400_naming_the_field(words, body, param, words_in_message):
    response = post(words, "/v1/sse", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert words_in_message in error["message"]


def test_a_streaming_package_sends_infer_clients_to_sse(words):
    response = post(words, "/v1/infer", {"prompt": "hi"})
    assert response.status_code == 400
    assert "/v1/sse" in response.json()["error"]["message"]


def test_the_llm_routes_refuse_a_package(words):
    response = post(words, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert httpx.get(words.url + "/v1/models").json()["data"][0] | {"created": 0} == {
        "id": "words", "object": "model", "created": 0, "owned_by": "rivulet", "kind": "package"}


# --- misbehaving packages ---------------------------------------------------------------------------


def recorded(path: Path, tag: str) -> str | None:
    """How the fixture's infer for ``tag`` ended, once it has (it writes one line per request)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return next((line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == tag), None)


def test_a_forgotten_finalise_still_ends_the_stream(misbehaving):
    for _ in range(2):
        assert stream(misbehaving, {"mode": "forget", "count": 2}) == [{"tick": 0}, {"tick": 1}, "[DONE]"]
    assert misbehaving.log().count("without calling finalise_streamed_output()") == 1


def test_an_exception_mid_stream_becomes_an_error_event(misbehaving):
    events = stream(misbehaving, {"mode": "raise"})
    assert events[0] == {"tick": 0} and events[-1] == "[DONE]"
    assert events[1] == {"error": {"message": "infer failed: RuntimeError: boom after one output",
                                   "type": "model_error", "code": "model_error"}}


@pytest.mark.parametrize("mode, words_in_message", [
    ("schema", "the output schema changed mid-stream ('tick' was number, now string)"),
    ("bytes", "output 'tick' cannot be sent as JSON (bytes"),
])
def test_a_bad_output_ends_the_stream_with_an_error_event(misbehaving, mode, words_in_message):
    events = stream(misbehaving, {"mode": mode})
    assert len(events) == 3 and events[0] == {"tick": 0}
    assert events[1]["error"]["type"] == "model_error"
    assert words_in_message in events[1]["error"]["message"]


def test_a_client_that_hangs_up_frees_the_engine_at_the_next_output(misbehaving, package_log):
    body = {"mode": "slow", "interval_ms": 20, "tag": "hangup"}
    with httpx.Client(timeout=WAIT_S) as client:
        with connect_sse(client, "POST", misbehaving.url + "/v1/sse", json=body) as source:
            first = next(e for e in source.iter_sse() if e.data)
        # leaving the block closed the connection mid-stream
    assert json.loads(first.data) == {"tick": 0}
    # The slow infer never ends by itself and its timeout is seconds away: only the hang-up can stop it.
    assert wait_for_record(package_log, "hangup") == "StreamClosed cancelled"
    assert stream(misbehaving, {"mode": "ok", "count": 1}) == [{"tick": 0}, "[DONE]"]
    metrics = httpx.get(misbehaving.url + "/metrics").text
    assert "rivulet_requests_cancelled_total 1.0" in metrics


def test_a_request_past_its_time_limit_ends_with_a_timeout_event(misbehaving, package_log):
    events = stream(misbehaving, {"mode": "slow", "interval_ms": 20, "tag": "late"})
    assert events[0] == {"tick": 0} and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "timeout"
    assert all(set(e) == {"tick"} for e in events[:-2])
    # infer records its ending just after the stream got its last event: wait for the line
    assert wait_for_record(package_log, "late") == "StreamClosed timeout"


def test_requests_queue_behind_a_running_infer_up_to_the_bound(misbehaving, package_log):
    # RIVULET_MAX_WAITING=1 here: one request runs, one waits, the next is refused before any stream starts.
    with httpx.Client(timeout=WAIT_S) as running_client, httpx.Client(timeout=WAIT_S) as waiting_client:
        slow = {"mode": "slow", "interval_ms": 20, "tag": "running"}
        with connect_sse(running_client, "POST", misbehaving.url + "/v1/sse", json=slow) as running:
            # kept in a variable: a dropped iterator is closed, and closing it closes the connection
            running_events = (e for e in running.iter_sse() if e.data)
            assert next(running_events).data == '{"tick":0}'  # its infer is on the engine thread now
            with connect_sse(waiting_client, "POST", misbehaving.url + "/v1/sse",
                             json={"mode": "ok", "count": 2, "tag": "waiting"}) as waiting:
                refused = post(misbehaving, "/v1/sse", {"mode": "ok"})
                assert refused.status_code == 429 and refused.headers["Retry-After"]
                assert refused.json()["error"]["type"] == "rate_limit_error"
                assert recorded(package_log, "waiting") is None  # still queued behind the slow infer
                running.response.close()  # its client leaves: the waiting request gets the engine
                assert [e.data for e in waiting.iter_sse() if e.data] == ['{"tick":0}', '{"tick":1}', "[DONE]"]
    assert recorded(package_log, "running") == "StreamClosed cancelled"


def test_finalize_runs_when_the_server_stops(misbehaving, package_log):
    # Last of the misbehaving server's tests: it stops the server.
    misbehaving.stop()
    assert package_log.read_text().splitlines()[-1] == "- finalized"


# --- other packages: non-streaming, the Inferless fixture, the torch example, a bad schema --------------


@pytest.fixture(scope="module")
def non_streaming(tmp_path_factory):
    yield from serve(PACKAGES / "non_streaming", tmp_path_factory)


def test_a_non_streaming_package_answers_one_json_object_on_infer(non_streaming):
    response = post(non_streaming, "/v1/infer", {"a": 2, "b": 40})
    assert response.status_code == 200
    assert response.json() == {"label": "sum", "value": 42, "calls": 1}
    kserve = {"inputs": [{"name": "a", "datatype": "INT64", "data": [1]}, {"name": "b", "data": [1]},
                         {"name": "negate", "datatype": "BOOL", "data": [True]}]}
    assert post(non_streaming, "/v1/infer", kserve).json() == {"label": "sum", "value": -2, "calls": 2}


def test_a_non_streaming_package_sends_one_event_on_sse(non_streaming):
    events = stream(non_streaming, {"a": 1, "b": 2, "label": "total"})
    assert events[0]["label"] == "total" and events[0]["value"] == 3
    assert events[1:] == ["[DONE]"]


def test_non_streaming_errors_are_json_answers(non_streaming):
    invalid = post(non_streaming, "/v1/infer", {"a": 1})
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "b"
    failed = post(non_streaming, "/v1/infer", {"a": -1, "b": 0})
    assert failed.status_code == 500
    assert failed.json()["error"]["message"] == "infer failed: ValueError: a must not be negative"


def test_the_inferless_package_runs_unchanged(tmp_path_factory):
    body = {"inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["There is a fine house in the forest"]},
        {"name": "max_words", "shape": [1], "datatype": "INT32", "data": [4]},
        {"name": "upper", "shape": [1], "datatype": "BOOL", "data": [True]},
    ]}
    for srv in serve(INFERLESS, tmp_path_factory):
        events = stream(srv, body)
    assert [e["OUT"] for e in events[:-1]] == ["THERE", "IS", "A", "FINE"]
    assert events[0]["meta"] == '{"length": 5}'


def test_the_torch_example_streams_one_event_per_generation(tmp_path_factory):
    for srv in serve(LIFE, tmp_path_factory):
        events = stream(srv, {"pattern": "blinker", "steps": 3, "size": 5})
    boards = [e["board"] for e in events[:-1]]
    assert [e["step"] for e in events[:-1]] == [0, 1, 2, 3]
    assert all(e["alive"] == 3 for e in events[:-1])
    assert boards[0] == boards[2] != boards[1] == boards[3]  # a blinker flips every generation
    assert boards[0] == ".....\n.....\n.###.\n.....\n....."


def test_a_bad_schema_stops_the_server_at_start_up(tmp_path):
    with pytest.raises(RuntimeError) as caught:
        with live_server({"RIVULET_MODEL": str(PACKAGES / "bad_schema")}, log_dir=tmp_path, ready_timeout=60):
            pass
    assert "INPUT_SCHEMA['temperature']" in str(caught.value)
    assert "must be INT, STRING or BOOLEAN" in str(caught.value)

"""Resumable streams under the real server (gunicorn + gevent worker, the demo model): resume after a
disconnect without loss or repetition, 204 after the end, 404 when unknown or expired, DELETE cancelling
the engine's work, CORS, and the request checks. Every test runs twice: with the streams in the
worker's memory (the default) and in Redis (RIVULET_STREAM_STORE, a real redis-server)."""
from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ALLOWED_ORIGIN, API_KEY, STREAMS_SERVER_ENV
from tests.live_server import LiveServer, live_server

AUTH = {"X-Auth-Token": API_KEY}
WAIT_S = 30  # bound on waits for things that take a second or two; never asserted on
LONG = 200  # tokens: a generation that lasts a second or more on a CPU, so a disconnect lands mid-stream


def chat_body(max_tokens: int = 32, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Tell me a fortune."}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


@pytest.fixture(scope="module", params=["memory", "redis"])
def streams_server(request, streams_server, tmp_path_factory) -> LiveServer:
    """The session's server (memory store), then one like it with its streams in Redis."""
    if request.param == "memory":
        yield streams_server
        return
    store = request.getfixturevalue("redis_service")
    env = {**STREAMS_SERVER_ENV, "RIVULET_STREAM_STORE": store.url}
    with live_server(env, log_dir=tmp_path_factory.mktemp("streams-server-redis")) as server:
        yield server


@pytest.fixture
def client() -> httpx.Client:
    with httpx.Client(timeout=WAIT_S) as c:
        yield c


def create(client: httpx.Client, srv: LiveServer, body: dict[str, Any], **params: str) -> str:
    """POST /v1/streams -> the stream's absolute URL."""
    answer = client.post(srv.url + "/v1/streams", json=body, headers=AUTH, params=params)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert created["url"] == f"/v1/streams/{created['id']}" == answer.headers["Location"]
    assert len(created["id"]) >= 32  # secrets.token_urlsafe(24): 192 random bits
    return srv.url + created["url"]


def read(client: httpx.Client, url: str, *, last_event_id: int | None = None,
         limit: int | None = None) -> list[ServerSentEvent]:
    """GET the stream; stop after ``limit`` events by closing the connection (a client-side drop)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    events = []
    with connect_sse(client, "GET", url, headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"] == "text/event-stream;charset=UTF-8"
        for event in source.iter_sse():
            if not event.data:
                continue  # the leading "retry:" block dispatches no event
            events.append(event)
            if limit is not None and len(events) >= limit:
                break
    return events


def text_of(events: list[ServerSentEvent]) -> str:
    parts = []
    for event in events:
        if event.data == "[DONE]":
            continue
        payload = json.loads(event.data)
        assert "error" not in payload, payload
        parts.append(payload["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


def uninterrupted_text(client: httpx.Client, srv: LiveServer, body: dict[str, Any]) -> str:
    answer = client.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"]


def assert_complete(events: list[ServerSentEvent]) -> None:
    """Every id exactly once, in order, and the done event last."""
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    assert (events[-1].event, events[-1].data) == ("done", "[DONE]")
    assert all(e.event == "message" for e in events[:-1])


def metric(client: httpx.Client, srv: LiveServer, name: str) -> float:
    families = text_string_to_metric_families(client.get(srv.url + "/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == name)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {what}")
        time.sleep(0.1)


def test_a_stream_reads_like_the_uninterrupted_request(streams_server, client):
    body = chat_body()
    url = create(client, streams_server, body)
    events = read(client, url)
    assert_complete(events)
    assert text_of(events) == uninterrupted_text(client, streams_server, body)


def test_resume_after_the_client_drops_delivers_every_token_once_in_order(streams_server, client):
    body = chat_body(LONG, ignore_eos=True)
    url = create(client, streams_server, body)
    first = read(client, url, limit=5)
    rest = read(client, url, last_event_id=int(first[-1].id))
    events = first + rest
    assert_complete(events)
    assert text_of(events) == uninterrupted_text(client, streams_server, body)


def test_resume_after_the_server_drops_the_connection_mid_stream(streams_server, client):
    body = chat_body(LONG, ignore_eos=True)
    url = create(client, streams_server, body)
    first = []
    with connect_sse(client, "GET", url) as source:
        for event in source.iter_sse():
            if not event.data:
                continue
            first.append(event)
            if len(first) == 2:
                dropped = client.post(url + "/drop-readers", headers=AUTH)
                assert dropped.json() == {"dropped": 1}
    assert first[-1].event != "done", "the connection ended before the last event"
    rest = read(client, url, last_event_id=int(first[-1].id))
    events = first + rest
    assert_complete(events)
    assert text_of(events) == uninterrupted_text(client, streams_server, body)


def test_the_query_parameter_resumes_for_clients_that_cannot_set_headers(streams_server, client):
    url = create(client, streams_server, chat_body(8))
    whole = read(client, url)
    tail = read(client, f"{url}?lastEventId=3")
    assert [e.id for e in tail] == [e.id for e in whole[3:]]
    # On a reconnect EventSource sends the header with its newest id; it wins over the URL's.
    with_both = client.get(f"{url}?lastEventId=1", headers={"Last-Event-ID": whole[-1].id})
    assert with_both.status_code == 204


def test_a_reconnect_after_the_last_event_gets_204(streams_server, client):
    url = create(client, streams_server, chat_body(8))
    events = read(client, url)
    assert client.get(url, headers={"Last-Event-ID": events[-1].id}).status_code == 204
    assert client.get(url, params={"lastEventId": events[-1].id}).status_code == 204
    assert len(read(client, url, last_event_id=int(events[-1].id) - 1)) == 1  # the done event, again


def test_unknown_ids_are_404(streams_server, client):
    for method in ("GET", "DELETE"):
        answer = client.request(method, streams_server.url + "/v1/streams/no-such-stream")
        assert answer.status_code == 404  # not 401: reading and cancelling need no key
        assert answer.json()["error"]["code"] == "stream_not_found"


def test_finished_streams_expire_after_the_retention_time(streams_server, client):
    url = create(client, streams_server, chat_body(4))
    events = read(client, url)
    assert client.get(url, headers={"Last-Event-ID": events[-1].id}).status_code == 204
    wait_until(lambda: client.get(url).status_code == 404, "the finished stream expired")
    assert client.get(url).json()["error"]["type"] == "not_found_error"


def test_delete_cancels_the_generation_and_frees_the_engine(streams_server, client):
    cancelled_before = metric(client, streams_server, "rivulet_requests_cancelled_total")
    url = create(client, streams_server, chat_body(LONG, ignore_eos=True))
    events = []
    with connect_sse(client, "GET", url) as source:
        for event in source.iter_sse():
            if not event.data:
                continue
            events.append(event)
            if len(events) == 1:
                assert metric(client, streams_server, "rivulet_requests_running") == 1
                assert client.delete(url).status_code == 204
    # The open reader is told, and its EventSource stops at the done event.
    assert json.loads(events[-2].data)["error"]["code"] == "cancelled"
    assert (events[-1].event, events[-1].data) == ("done", "[DONE]")
    assert len(events) < LONG
    wait_until(lambda: metric(client, streams_server, "rivulet_requests_running") == 0,
               "the engine dropped the cancelled request")
    assert metric(client, streams_server, "rivulet_requests_cancelled_total") == cancelled_before + 1
    assert client.get(url).status_code == 404
    assert client.delete(url).status_code == 404


def test_starting_a_stream_needs_the_key(streams_server, client):
    answer = client.post(streams_server.url + "/v1/streams", json=chat_body())
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("kind, body", [
    ("completion", {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}),
    ("chat", chat_body(6)),
])
def test_kind_as_query_parameter_or_body_field(streams_server, client, kind, body):
    for url in (create(client, streams_server, body, kind=kind),
                create(client, streams_server, {**body, "kind": kind})):
        events = read(client, url)
        assert_complete(events)
        first = json.loads(events[0].data)
        assert first["object"] == ("chat.completion.chunk" if kind == "chat" else "text_completion")


@pytest.mark.parametrize("body, params, param", [
    (chat_body(), {"kind": "image"}, "kind"),
    ({**chat_body(), "kind": ["chat"]}, {}, "kind"),
    ({**chat_body(), "kind": "package"}, {}, None),  # the demo server runs an LLM, not a package
    ({"max_tokens": 4}, {}, "messages"),
    ({**chat_body(), "temperature": "hot"}, {}, "temperature"),
])
def test_invalid_bodies_are_400_before_any_stream_exists(streams_server, client, body, params, param):
    answer = client.post(streams_server.url + "/v1/streams", json=body, headers=AUTH, params=params)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert param in (error["param"] or "") + error["message"]


@pytest.mark.parametrize("where, value", [
    ("Last-Event-ID", "abc"), ("Last-Event-ID", "-1"), ("Last-Event-ID", "9999"),
    ("lastEventId", "\u00b2"), ("lastEventId", "1e3"), ("lastEventId", "9999"),
])
def test_a_bad_last_event_id_is_400(streams_server, client, where, value):
    url = create(client, streams_server, chat_body(4))
    if where == "Last-Event-ID":
        answer = client.get(url, headers={where: value})
    else:
        answer = client.get(url, params={where: value})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == where


def preflight(client: httpx.Client, srv: LiveServer, origin: str, method: str, headers: str) -> httpx.Response:
    return client.options(srv.url + "/v1/streams/some-id", headers={
        "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers})


def test_cors_preflight_passes_for_the_allowed_origin(streams_server, client):
    answer = preflight(client, streams_server, ALLOWED_ORIGIN, "GET", "last-event-id")
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "last-event-id" in answer.headers["Access-Control-Allow-Headers"].lower()
    post = client.options(streams_server.url + "/v1/streams", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-auth-token"})
    assert post.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "POST" in post.headers["Access-Control-Allow-Methods"]
    # The actual answers carry the header too, so the page's script may read them.
    created = client.post(streams_server.url + "/v1/streams", json=chat_body(2),
                          headers={**AUTH, "Origin": ALLOWED_ORIGIN})
    assert created.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "Location" in created.headers["Access-Control-Expose-Headers"]


def test_cors_preflight_fails_for_another_origin(streams_server, client):
    answer = preflight(client, streams_server, "http://elsewhere.example", "GET", "last-event-id")
    assert "Access-Control-Allow-Origin" not in answer.headers
    created = client.post(streams_server.url + "/v1/streams", json=chat_body(2),
                          headers={**AUTH, "Origin": "http://elsewhere.example"})
    assert "Access-Control-Allow-Origin" not in created.headers


def test_the_demo_page_and_its_script_are_served_without_a_key(streams_server, client):
    page = client.get(streams_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="demo/app.js"' in page.text
    script = client.get(streams_server.url + "/demo/app.js")
    assert script.status_code == 200 and "EventSource" in script.text

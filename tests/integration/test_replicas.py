"""Two replicas behind a real nginx (deploy/nginx.conf), sharing resumable streams through a real Redis.

Checks what a user of several replicas relies on: streams through nginx arrive event by event (no proxy
buffering); a stream started on one replica is resumed after a dropped connection on the other without
losing or repeating an event, and is cancelled through the other replica in the engine that runs it;
Redis down stops only resumable streams; SIGTERM to one replica drains its streams while the other
serves. Needs Debian's redis-server and nginx (skipped without them, failing under CI=true).

The tests share one set of servers (module scope); the last two change it (Redis restarted, a replica
stopped), so they stay last in this file.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import missing_tool
from tests.integration.streams import metric, read_until, send_request
from tests.integration.test_streams import assert_complete, chat_body, read, text_of, uninterrupted_text
from tests.live_server import LiveServer, live_server
from tests.nginx_server import NginxServer, nginx_binary, nginx_server
from tests.redis_server import RedisServer, redis_server, redis_server_binary

LONG = 200  # tokens: a generation that lasts a second or more on a CPU, so things happen mid-stream
# gunicorn's graceful_timeout for the replicas. Above nginx's upstream keepalive_timeout (4 s): nginx's
# idle connections to a draining replica hold its worker until nginx closes them.
GRACE_S = 8
WAIT_S = 30


@dataclass
class Replicas:
    a: LiveServer
    b: LiveServer
    nginx: NginxServer
    redis: RedisServer
    log_dir: Path


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[Replicas]:
    if redis_server_binary() is None:
        missing_tool("redis-server is not installed (apt-get install redis-server)")
    if nginx_binary() is None:
        missing_tool("nginx is not installed (apt-get install nginx)")
    log_dir = tmp_path_factory.mktemp("replicas")
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(redis_server(log_dir))
        env = {
            "RIVULET_STREAM_STORE": store.url,
            "RIVULET_DEVICE": "cpu",
            "RIVULET_HEARTBEAT_S": "1",
            # Short, so a replica that ignored readers on the other one would cancel within the test.
            "RIVULET_STREAM_READER_GRACE_S": "1",
            "RIVULET_REQUEST_TIMEOUT_S": "30",
        }
        args = ("--graceful-timeout", str(GRACE_S))
        a = stack.enter_context(live_server(env, log_dir=log_dir, extra_args=args))
        b = stack.enter_context(live_server(env, log_dir=log_dir, extra_args=args))
        proxy = stack.enter_context(nginx_server([a.url.removeprefix("http://"), b.url.removeprefix("http://")],
                                                 log_dir / "nginx"))
        yield Replicas(a, b, proxy, store, log_dir)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=WAIT_S) as c:
        yield c


def running(*servers: LiveServer) -> float:
    return sum(metric(s, "rivulet_requests_running") for s in servers)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {what}")
        time.sleep(0.05)


def start_stream(client: httpx.Client, server: LiveServer | NginxServer, body: dict) -> str:
    """POST /v1/streams -> the stream's path."""
    answer = client.post(server.url + "/v1/streams", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()["url"]


def test_streams_through_nginx_arrive_event_by_event(replicas, client):
    body = {**chat_body(LONG, ignore_eos=True), "stream": True}
    # As a browser asks: a proxy that compressed the stream would hold events back to fill its blocks.
    sock = send_request(replicas.nginx, "/v1/chat/completions", body, {"Accept-Encoding": "gzip"})
    received = read_until(sock, b"data: {")
    # The first event came through while the generation was still running: nothing held it back.
    assert running(replicas.a, replicas.b) >= 1
    reads = [received.count(b"\ndata: ") + received.startswith(b"data: ")]
    while b"data: [DONE]" not in received:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before [DONE]"
        received += chunk
        reads.append(chunk.count(b"data: "))
    sock.close()
    head, _, _ = received.partition(b"\r\n\r\n")
    assert b"text/event-stream" in head
    assert b"content-length" not in head.lower() and b"content-encoding" not in head.lower()
    events = received.count(b"data: ")
    # A buffering proxy passes a stream on in buffer-sized blocks of dozens of events; here they come
    # in many small reads (several events in one read are fine: the client may fall behind).
    assert events > LONG / 2 and sum(1 for n in reads if n) > events / 4, (events, reads)

    # A resumable stream through nginx reads like the direct one.
    body = chat_body(16)
    url = start_stream(client, replicas.nginx, body)
    events = read(client, replicas.nginx.url + url)
    assert_complete(events)
    assert text_of(events) == uninterrupted_text(client, replicas.nginx, body)


def test_a_stream_started_on_one_replica_resumes_on_the_other_without_loss_or_repeat(replicas, client):
    a, b = replicas.a, replicas.b
    body = chat_body(LONG, ignore_eos=True)
    generated_before = metric(b, "rivulet_generated_tokens_total")
    url = start_stream(client, a, body)
    first = read(client, a.url + url, limit=5)  # then the connection drops (the client closes it)
    assert running(a) == 1 and running(b) == 0  # A's engine still producing: B follows it live
    rest = read(client, b.url + url, last_event_id=int(first[-1].id))
    events = first + rest
    assert_complete(events)
    assert text_of(events) == uninterrupted_text(client, a, body)
    # B only read: its engine generated nothing for it (the uninterrupted request ran on A).
    assert metric(b, "rivulet_generated_tokens_total") == generated_before
    # Both replicas answer for the finished stream the same way: 204 after its last event.
    for server in (a, b):
        assert client.get(server.url + url, headers={"Last-Event-ID": events[-1].id}).status_code == 204


def test_a_cancel_through_the_other_replica_stops_the_engine_that_runs_the_stream(replicas, client):
    a, b = replicas.a, replicas.b
    cancelled = {s.url: metric(s, "rivulet_requests_cancelled_total") for s in (a, b)}
    url = start_stream(client, a, chat_body(LONG, ignore_eos=True))
    events = []
    with connect_sse(client, "GET", b.url + url) as source:  # B tails what A produces
        for event in source.iter_sse():
            if not event.data:
                continue
            events.append(event)
            if len(events) == 1:
                assert running(a) == 1
                assert client.delete(b.url + url).status_code == 204
    assert json.loads(events[-2].data)["error"]["code"] == "cancelled"
    assert (events[-1].event, events[-1].data) == ("done", "[DONE]")
    assert len(events) < LONG
    wait_until(lambda: running(a) == 0, "A's engine dropped the cancelled request")
    assert metric(a, "rivulet_requests_cancelled_total") == cancelled[a.url] + 1
    assert metric(b, "rivulet_requests_cancelled_total") == cancelled[b.url]
    for server in (a, b):
        assert client.get(server.url + url).status_code == 404


def test_with_redis_down_only_resumable_streams_fail(replicas, client):
    a = replicas.a
    replicas.redis.stop()
    try:
        refused = client.post(replicas.nginx.url + "/v1/streams", json=chat_body(4))
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "stream_store_unavailable" and "Redis" in error["message"]
        # Direct streams are untouched, and the replica stays in service, saying what is wrong.
        direct = client.post(replicas.nginx.url + "/v1/chat/completions", json={**chat_body(4), "stream": True})
        assert direct.status_code == 200 and direct.text.rstrip().endswith("data: [DONE]")
        ready = client.get(a.url + "/ready")
        assert ready.status_code == 200
        assert ready.json()["stream_store"] == {"backend": "redis", "reachable": False,
                                                "error": ready.json()["stream_store"]["error"]}
    finally:
        replicas.redis.start()  # the same port: the replicas' setting names it
    assert client.get(a.url + "/ready").json()["stream_store"] == {"backend": "redis", "reachable": True}
    assert_complete(read(client, a.url + start_stream(client, a, chat_body(4))))  # Redis back: streams work


def test_sigterm_drains_one_replica_while_the_other_serves(replicas, client):
    a, b = replicas.a, replicas.b
    long_body = chat_body(LONG, ignore_eos=True)

    def read_direct() -> list[str]:
        with httpx.Client(timeout=WAIT_S, headers={"Connection": "close"}) as own:
            with connect_sse(own, "POST", a.url + "/v1/chat/completions",
                             json={**long_body, "stream": True}) as source:
                return [e.data for e in source.iter_sse() if e.data]

    def read_through_b(url: str) -> list:
        with httpx.Client(timeout=WAIT_S, headers={"Connection": "close"}) as own:
            return read(own, b.url + url)

    wait_until(lambda: running(a) == 0, "A idle before the test")  # so "2 running" below means these two
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        resumable_url = start_stream(client, a, long_body)
        direct = pool.submit(read_direct)
        resumable = pool.submit(read_through_b, resumable_url)
        wait_until(lambda: running(a) == 2 or direct.done(), "both of A's streams running")
        a.proc.send_signal(signal.SIGTERM)
        served = []
        while a.proc.poll() is None:  # A drains: every request through nginx is served by B
            answer = client.post(replicas.nginx.url + "/v1/chat/completions", json=chat_body(2))
            served.append(answer.status_code if answer.status_code == 200 else (answer.status_code, answer.text))
            time.sleep(0.1)
        direct_data, resumable_events = direct.result(WAIT_S), resumable.result(WAIT_S)

    assert a.proc.returncode == 0
    assert served and all(status == 200 for status in served), served
    # A's direct stream and its resumable one (read on B) both ended properly: finished within the
    # grace time or ended by the shutdown event, then [DONE]; nothing was cut.
    assert direct_data[-1] == "[DONE]"
    assert_complete(resumable_events)
    for last in (json.loads(direct_data[-2]), json.loads(resumable_events[-2].data)):
        assert last.get("error", {}).get("code") == "shutdown" or last["choices"][0]["finish_reason"] == "length"
    assert "Worker graceful timeout" not in a.log()
    assert "Worker exiting" in a.log()  # the worker ended by itself, not killed by the master at the limit
    answer = client.post(replicas.nginx.url + "/v1/chat/completions", json=chat_body(2))
    assert answer.status_code == 200

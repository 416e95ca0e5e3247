"""Slow clients (slowloris): connections that send half a request head, or a body slower than a byte a
second, delay nobody else and are dropped after a bound: gunicorn's ``keepalive`` for the head,
RIVULET_BODY_TIMEOUT_S for the body (short ones here)."""
from __future__ import annotations

import json
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.live_server import LiveServer, live_server

HALF_HEADERS = 500
SLOW_BODIES = 20
KEEPALIVE_S = 2  # bounds the request head
BODY_TIMEOUT_S = 2  # bounds the request body
# Far more than either bound plus the time to open the sockets on a loaded machine; only a server that
# never drops them runs into it.
DROP_DEADLINE_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    env = {"RIVULET_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "RIVULET_HEARTBEAT_S": "1", "RIVULET_DEVICE": "cpu"}
    with live_server(env, log_dir=tmp_path_factory.mktemp("slow-clients"),
                     extra_args=("--keep-alive", str(KEEPALIVE_S))) as live:
        yield live


@pytest.fixture
def enough_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = HALF_HEADERS + SLOW_BODIES + 200
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-files limit ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: rivulet\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


class Trickle(threading.Thread):
    """Sends each socket one more byte of its body every second, until the server closes it."""

    def __init__(self, socks: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.socks = list(socks)
        self.stop = threading.Event()

    def run(self) -> None:
        while self.socks and not self.stop.wait(1.0):
            for sock in list(self.socks):
                try:
                    sock.send(b" ")
                except OSError:  # the server closed it: the point of the test
                    self.socks.remove(sock)


def wait_until_closed(socks: list[socket.socket], deadline_s: float) -> dict[socket.socket, bytes]:
    """Read every socket until the server closes it. -> what each received, for those it closed."""
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytes] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        received[sock] = b""
    closed: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + deadline_s
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if data:
                received[sock] += data
            else:
                selector.unregister(sock)
                closed[sock] = received[sock]
    selector.close()
    return closed


def test_slow_clients_delay_nobody_and_are_dropped(server, enough_files):
    half_headers = []
    for _ in range(HALF_HEADERS):
        sock = connect(server.url)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: rivulet\r\nContent-Ty")
        half_headers.append(sock)
    slow_bodies = []
    for _ in range(SLOW_BODIES):
        sock = connect(server.url)
        sock.sendall(head(1000) + b'{"messages": ')
        slow_bodies.append(sock)
    trickle = Trickle(slow_bodies)
    trickle.start()
    try:
        # Meanwhile a normal client streams as usual.
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True}
        with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as response:
            assert response.status_code == 200
            data = [line for line in response.iter_lines() if line.startswith(b"data:")]
        assert data[-1] == b"data: [DONE]" and json.loads(data[0][5:])["choices"]

        closed = wait_until_closed(half_headers + slow_bodies, DROP_DEADLINE_S)
    finally:
        trickle.stop.set()
        for sock in half_headers + slow_bodies:
            sock.close()

    assert sum(sock in closed for sock in half_headers) == HALF_HEADERS
    assert sum(sock in closed for sock in slow_bodies) == SLOW_BODIES
    # A half head gets nothing (there is no request to answer); a late body gets a JSON 408.
    assert all(closed[sock] == b"" for sock in half_headers)
    for sock in slow_bodies:
        status_line, _, rest = closed[sock].partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408 "), closed[sock][:200]
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "request_body_timeout" and "RIVULET_BODY_TIMEOUT_S" in error["message"]
    # And the server still serves.
    assert requests.get(server.url + "/ready", timeout=10).status_code == 200


def test_a_body_that_arrives_in_time_is_served(server):
    """The body bound is on the whole body, not on a fast upload split into parts."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    sock = connect(server.url)
    with sock:
        sock.sendall(head(len(body)) + body[:10])
        time.sleep(0.5)
        sock.sendall(body[10:])
        sock.settimeout(30)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ")

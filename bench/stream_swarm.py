"""Thousands of event-stream clients in one thread, for load tests and benches.

One OS thread per client would cost megabytes each and thousands of threads would bury a 2-core machine,
so every client is a non-blocking socket on one ``selectors`` loop (epoll on Linux, which, unlike
``select``, takes descriptors past 1024). Each speaks HTTP/1.1 through h11, which parses the response and
undoes the chunked transfer coding; the body is kept whole so tests can parse its events afterwards.

While the streams run, only two things are looked for in each body, by a plain byte search: the first
``: ping`` heartbeat and ``data: [DONE]``. Running a full SSE parser over thousands of streams at every
read would cost more than the server under test; a finished body can still be parsed properly
(tests.sse_client.events_from_bytes).

    swarm = Swarm(url, "/v1/sse", lambda index: {"prompt": "a b c"})
    swarm.open(3000)                                     # connects at a pace the listen backlog takes
    swarm.pump(lambda: swarm.count(StreamClient.pinged) == 3000, timeout=60)
    swarm.hang_up(swarm.clients[:10])
    swarm.close()
"""
from __future__ import annotations

import errno
import json
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11

PING = b": ping\n"
DONE = b"data: [DONE]\n"
FIRST_DATA = b"data: "  # a stream's first event (a token, a package output, or an error)
# A marker may straddle two reads: search again from this far before the new bytes.
_OVERLAP = max(len(PING), len(DONE))
_READ_SIZE = 65536


@dataclass(eq=False)
class StreamClient:
    """One client: its connection and what it has seen. Times are ``time.monotonic()`` values."""

    index: int
    sock: socket.socket
    h11_conn: h11.Connection
    outgoing: bytes
    opened_at: float
    status: int | None = None
    body: bytearray = field(default_factory=bytearray)
    first_data_at: float | None = None
    first_ping_at: float | None = None
    done_at: float | None = None
    ended_at: float | None = None  # the response is complete, or the connection ended
    error: str | None = None  # the connection failed (refused, reset) before the response was complete
    hung_up: bool = False  # closed by us before the end

    @property
    def pinged(self) -> bool:
        return self.first_ping_at is not None

    @property
    def done(self) -> bool:
        return self.done_at is not None

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def has_data(self) -> bool:
        return self.first_data_at is not None

    def _take(self, data: bytes, now: float) -> None:
        start = max(0, len(self.body) - _OVERLAP)
        self.body += data
        if self.first_ping_at is None and self.body.find(PING, start) >= 0:
            self.first_ping_at = now
        if self.first_data_at is None and self.body.find(FIRST_DATA, start) >= 0:
            self.first_data_at = now
        if self.done_at is None and self.body.find(DONE, start) >= 0:
            self.done_at = now


class Swarm:
    """Event-stream clients of one server, all sending ``POST path`` with ``body_for(index)`` as JSON.

    ``open(n)`` queues n more clients; ``pump`` connects them (at most ``max_unanswered`` waiting for
    their response head at a time, so the server's listen backlog never overflows and no connection waits
    for a SYN retry) and reads every response until a condition holds. A client whose response is
    complete is closed at once (the server would otherwise keep it alive)."""

    def __init__(self, url: str, path: str, body_for: Callable[[int], dict[str, Any]], *,
                 headers: dict[str, str] | None = None, max_unanswered: int = 256) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.path = path
        self.body_for = body_for
        self.headers = headers or {}
        self.max_unanswered = max_unanswered
        self.clients: list[StreamClient] = []
        self._to_open = 0
        self._unanswered = 0  # connected or connecting, no response head yet
        self._selector = selectors.DefaultSelector()

    # --- driving ----------------------------------------------------------------------------------

    def open(self, count: int) -> None:
        self._to_open += count

    def pump(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Connect and read until ``condition()`` holds or ``timeout`` seconds pass. -> whether it held."""
        deadline = time.monotonic() + timeout
        while not condition():
            now = time.monotonic()
            if now >= deadline:
                return False
            self._connect_more(now)
            for key, mask in self._selector.select(timeout=min(0.2, deadline - now)):
                client: StreamClient = key.data
                if mask & selectors.EVENT_WRITE:
                    self._send(client)
                elif mask & selectors.EVENT_READ:
                    self._receive(client)
        return True

    def hang_up(self, clients: Iterable[StreamClient]) -> None:
        """Close these clients' connections now, as a client that leaves mid-stream does."""
        for client in clients:
            if not client.ended:
                client.hung_up = True
                self._finish(client, time.monotonic())

    def close(self) -> None:
        for client in self.clients:
            if not client.ended:
                self._finish(client, time.monotonic())
        self._selector.close()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading results --------------------------------------------------------------------------

    def count(self, predicate: Callable[[StreamClient], bool]) -> int:
        return sum(1 for client in self.clients if predicate(client))

    @property
    def all_opened(self) -> bool:
        return self._to_open == 0

    # --- the loop's steps ----------------------------------------------------------------------------

    def _connect_more(self, now: float) -> None:
        while self._to_open and self._unanswered < self.max_unanswered:
            self._to_open -= 1
            self._unanswered += 1
            self._connect(len(self.clients), now)

    def _connect(self, index: int, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = h11.Connection(h11.CLIENT)
        payload = json.dumps(self.body_for(index)).encode()
        headers = [("Host", f"{self.address[0]}:{self.address[1]}"), ("Content-Type", "application/json"),
                   ("Accept", "text/event-stream"), ("Content-Length", str(len(payload))),
                   *self.headers.items()]
        outgoing = (conn.send(h11.Request(method="POST", target=self.path, headers=headers))
                    + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
        client = StreamClient(index, sock, conn, outgoing, now)
        self.clients.append(client)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            client.error = f"connect: {errno.errorcode.get(code, code)}"
            self._finish(client, now)
            return
        self._selector.register(sock, selectors.EVENT_WRITE, client)

    def _send(self, client: StreamClient) -> None:
        code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            client.error = f"connect: {errno.errorcode.get(code, code)}"
            self._finish(client, time.monotonic())
            return
        try:
            sent = client.sock.send(client.outgoing)
        except BlockingIOError:
            return
        except OSError as exc:
            client.error = f"send: {exc}"
            self._finish(client, time.monotonic())
            return
        client.outgoing = client.outgoing[sent:]
        if not client.outgoing:
            self._selector.modify(client.sock, selectors.EVENT_READ, client)

    def _receive(self, client: StreamClient) -> None:
        now = time.monotonic()
        try:
            data = client.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            client.error = f"recv: {exc}"
            self._finish(client, now)
            return
        client.h11_conn.receive_data(data)  # b"" tells h11 the server closed the connection
        while True:
            try:
                event = client.h11_conn.next_event()
            except h11.RemoteProtocolError as exc:  # e.g. the connection closed mid-body
                client.error = f"protocol: {exc}"
                self._finish(client, now)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Response):
                client.status = event.status_code
                self._unanswered -= 1
            elif isinstance(event, h11.Data):
                client._take(bytes(event.data), now)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                self._finish(client, now)
                return
        if not data:
            client.error = client.error or "the server closed the connection mid-response"
            self._finish(client, now)

    def _finish(self, client: StreamClient, now: float) -> None:
        if client.status is None:
            self._unanswered -= 1
        client.ended_at = now
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):  # never registered (connect failed at once), or already closed
            pass
        client.sock.close()

"""Seeing a gone client before writing to it: the socket probe behind cancel-on-disconnect."""
from __future__ import annotations

from gevent import socket

from service.http import socket_closed


def test_an_open_idle_connection_is_not_closed():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert not socket_closed(ours)


def test_a_pipelined_request_is_data_not_a_close_and_stays_unread():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"GET /health HTTP/1.1\r\n")
        assert not socket_closed(ours)
        assert ours.recv(64) == b"GET /health HTTP/1.1\r\n"  # peeked, not consumed


def test_a_client_that_closed_is_seen_at_once():
    ours, theirs = socket.socketpair()
    with ours:
        theirs.close()
        assert socket_closed(ours)


def test_a_socket_closed_on_our_side_counts_as_gone_and_no_socket_as_never():
    ours, theirs = socket.socketpair()
    with theirs:
        ours.close()
        assert socket_closed(ours)
    assert not socket_closed(None)

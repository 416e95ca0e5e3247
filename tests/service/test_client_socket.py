"""Seeing a gone client before writing to it: the socket probe behind cancel-on-disconnect."""
from __future__ import annotations

from gevent import socket

from service.client_socket import socket_closed


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


def test_a_connection_on_a_descriptor_past_1024_is_probed_like_any_other():
    # select() cannot take fd >= 1024: such connections used to look gone before their first event.
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        import pytest
        pytest.skip(f"the hard open-files limit ({hard}) is below 1100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    try:
        ours, theirs = socket.socketpair()
        high = socket.socket(fileno=os.dup2(ours.fileno(), 1050))
        ours.close()
        with high, theirs:
            assert high.fileno() >= 1024
            assert not socket_closed(high)
            theirs.sendall(b"x")
            assert not socket_closed(high)
            assert high.recv(1) == b"x"
            theirs.close()
            assert socket_closed(high)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_hang_up_is_seen_by_the_event_loop_without_a_write():
    import gevent

    from service.client_socket import on_hang_up

    ours, theirs = socket.socketpair()
    calls = []
    with ours:
        watch = on_hang_up(ours, lambda: calls.append("gone"))
        gevent.sleep(0.01)
        assert calls == [] and watch.watching  # an open, quiet client: the loop keeps watching
        theirs.close()
        for _ in range(100):
            if calls:
                break
            gevent.sleep(0.01)
        assert not watch.watching  # it looked once and stopped: the writes' own probe takes over
        watch.stop()
    assert calls == ["gone"]


def test_a_pipelined_request_is_not_a_hang_up_and_is_looked_at_once():
    import gevent

    from service.client_socket import on_hang_up

    ours, theirs = socket.socketpair()
    calls = []
    with ours, theirs:
        watch = on_hang_up(ours, lambda: calls.append("gone"))
        theirs.sendall(b"GET /health HTTP/1.1\r\n")
        gevent.sleep(0.05)
        # Not a hang-up, but the loop no longer watches: a later close is left to the writes.
        assert not watch.watching
        watch.stop()
        assert calls == [] and ours.recv(64) == b"GET /health HTTP/1.1\r\n"


def test_a_stopped_watch_says_it_no_longer_watches_and_stops_twice_safely():
    from service.client_socket import on_hang_up

    ours, theirs = socket.socketpair()
    with ours, theirs:
        watch = on_hang_up(ours, lambda: None)
        assert watch.watching
        watch.stop()
        watch.stop()
        assert not watch.watching
    assert not on_hang_up(None, lambda: None).watching  # nothing to watch (no gunicorn socket)

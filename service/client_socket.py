"""Seeing a gone client without writing to it: the socket probe behind cancel-on-disconnect."""
from __future__ import annotations

import _socket
import socket
from collections.abc import Callable
from typing import Any

import gevent
from flask import request


def client_socket() -> Any:
    """This request's connection (gunicorn puts it in the environ); None outside gunicorn (test client)."""
    return request.environ.get("gunicorn.socket")


def socket_closed(sock: Any) -> bool:
    """Has the client closed ``sock``? Its request body is read, so the socket has bytes to read only when
    the client closed it (EOF) or pipelined its next request (data): a non-blocking peek tells which.
    Asking before a write catches a gone client at once; a write alone fails only at the second write
    after the close. No socket to look at: never closed.

    Only a definite answer counts as gone: EOF, a reset, or a socket already closed on our side. Anything
    else (no data yet, an error we cannot read) is "alive", and the next write decides. The probe never
    uses ``select``, which cannot take a descriptor of 1024 or more (every stream past the first
    thousand or so would look gone), and never the gevent socket's ``recv``, which waits for data.
    """
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return True  # closed on our side already
    probe = _socket.socket(fileno=fd)  # the C socket: no gevent wait, no select; borrowed, never closed
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # nothing to read: the client is still there
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return True
    except OSError:
        return False  # could not tell: let the next write decide
    finally:
        probe.detach()


def client_gone() -> bool:
    """Has the client of the current request hung up? (For use inside a request context.)"""
    return socket_closed(client_socket())


class HangUpWatch:
    """What ``on_hang_up`` returns. ``watching``: whether the event loop still watches the socket, True
    until the socket first turns readable (a close, or a pipelined request) or ``stop()``. While it
    watches, a close is seen without asking the socket."""

    __slots__ = ("_watcher",)

    def __init__(self, watcher: Any) -> None:
        self._watcher = watcher

    @property
    def watching(self) -> bool:
        return self._watcher is not None and self._watcher.active

    def stop(self) -> None:
        """Stop watching (when the response ends). Safe to call twice."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None


def on_hang_up(sock: Any, callback: Callable[[], None]) -> HangUpWatch:
    """Call ``callback`` on the hub as soon as the client closes ``sock``, without waiting for a write.
    -> a ``HangUpWatch``: stop it when the response ends.

    A stream still queued has nothing to write until its heartbeat (RIVULET_HEARTBEAT_S, 15 s): the event
    loop's read watcher on its socket notices the close at once, and costs nothing while the client
    stays. The socket turns readable only on a close or a pipelined request; either way the watcher
    looks once and stops (data is left for the writes to sort out, so it never spins).
    """
    if sock is None or sock.fileno() < 0:
        return HangUpWatch(None)
    watcher = gevent.get_hub().loop.io(sock.fileno(), _READ)
    watcher.ref = False  # it must not keep an idle worker's loop alive

    def readable() -> None:
        watcher.stop()
        if socket_closed(sock):
            callback()

    watcher.start(readable)
    return HangUpWatch(watcher)


_READ = 1  # libev's EV_READ

"""The crossing from the engine's OS thread to the greenlets of this worker.

The engine thread may not touch gevent objects: a gevent queue filled from another thread does not wake
the hub, and a greenlet can then stall for up to a second. So the thread only appends
``(channel, event)`` to a deque (atomic under the GIL) and calls ``send()`` on one ``loop.async_()``
watcher, which libev makes safe to call from any thread. The watcher's callback runs on the hub and
moves each event into its channel's gevent queue, which wakes exactly the greenlet waiting there.

One ``Bridge`` per worker, created on the hub's thread; one ``Channel`` per request (it is the
request's ``models.api.Sink``). This module and the routes are the only gevent-aware code.
"""
from __future__ import annotations

from collections import deque

import gevent
from gevent.queue import Empty, SimpleQueue

from models.api import Event


class Bridge:
    def __init__(self, hub: gevent.hub.Hub | None = None) -> None:
        hub = hub or gevent.get_hub()
        self._pending: deque[tuple[Channel, Event]] = deque()
        self._watcher = hub.loop.async_()
        # An idle worker must still be able to exit: the watcher alone does not keep the loop alive.
        self._watcher.ref = False
        self._watcher.start(self._deliver)

    def channel(self) -> Channel:
        return Channel(self)

    def post(self, channel: Channel, event: Event) -> None:
        """Called from the engine thread."""
        self._pending.append((channel, event))
        self._watcher.send()

    def _deliver(self) -> None:
        """Runs on the hub. A send() that races this loop sets the watcher pending again: nothing is missed."""
        pending = self._pending
        while pending:
            channel, event = pending.popleft()
            channel._queue.put_nowait(event)

    def close(self) -> None:
        self._watcher.stop()
        self._watcher.close()


class Channel:
    """One request's events, in the order the engine produced them."""

    __slots__ = ("_bridge", "_queue")

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge
        self._queue: SimpleQueue = SimpleQueue()

    def put(self, event: Event) -> None:
        """The ``Sink`` side: called from the engine thread."""
        self._bridge.post(self, event)

    def waiting(self) -> int:
        """Events delivered to this channel and not yet read (the reader fell behind the engine)."""
        return self._queue.qsize()

    def get(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds. Never blocks without a bound."""
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except Empty:
            return None

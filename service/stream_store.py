"""The replay buffer behind resumable streams (``POST /v1/streams`` then ``GET /v1/streams/{id}``).

A stream is an append-only list of events numbered 1, 2, 3, ... A background greenlet appends the
work's payloads as they are produced; readers (one ``GET`` at a time, usually) read the events after the
last id they saw and wait for more. ``finish`` appends the last event and marks the stream finished;
a finished stream is kept ``retention_s`` and then forgotten, as is a deleted one at once.

``StreamStore`` is the narrow interface the routes use; ``MemoryStreamStore`` keeps everything in the
worker process (enough for one worker: a stream must be read from the worker that runs it).
``service.redis_stream_store.RedisStreamStore`` implements the same methods in Redis, for several
replicas; ``open_store`` picks one from ``RIVULET_STREAM_STORE``.

Bounds, and what happens at them (the choice is deliberate: a live generation is never refused an
event, and a reader that keeps up never loses one):
- per stream, ``max_events`` and ``max_bytes``: the stream's oldest events are dropped from the
  replay buffer; a reader that asks for a dropped id is told which ids are gone (``Slice.dropped``).
- in total, ``total_bytes``: ``create`` refuses new streams (``StoreFull``, a 429) while the total is
  at the bound, and an append that pushes the total over it drops the appending stream's oldest events.
- the newest event of a stream is never dropped (its reader may not have seen it yet), so the total can
  pass the bound by at most one event per stream.
Bytes are counted as the UTF-8 size of the events' data.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Callable, Protocol

import gevent.event

from models.errors import EngineUnavailable, NotFound, QueueFull
from service.settings import Settings


def _default(setting: str) -> object:
    return Settings.model_fields[setting].default


@dataclass(frozen=True)
class StoreBounds:
    """The replay buffer's bounds; the defaults are the settings' (service/settings.py defines them once)."""

    max_events: int = _default("stream_max_events")  # per stream (RIVULET_STREAM_MAX_EVENTS)
    max_bytes: int = _default("stream_max_bytes")  # per stream (RIVULET_STREAM_MAX_BYTES)
    total_bytes: int = _default("stream_total_bytes")  # all streams together (RIVULET_STREAM_TOTAL_BYTES)
    retention_s: float = _default("stream_retention_s")  # finished streams kept (RIVULET_STREAM_RETENTION_S)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    data: str  # one SSE data payload (JSON text or "[DONE]"), no raw newline
    name: str | None = None  # the SSE event name; None is the default "message"


@dataclass(frozen=True, slots=True)
class Slice:
    """What a reader gets: the events after the id it asked for, as far as the buffer still has them."""

    events: tuple[StoredEvent, ...]
    last_id: int  # the id of the newest event appended so far (0: none yet)
    finished: bool  # no event will follow last_id
    dropped: tuple[int, int] | None = None  # (first, last) ids asked for but dropped at the bounds


class StreamGone(NotFound):
    """The stream id is unknown, expired, or deleted."""

    code = "stream_not_found"


class StoreFull(QueueFull):
    """The replay buffers together hold ``total_bytes``: no new stream until some expire."""

    code = "stream_store_full"


class StoreUnavailable(EngineUnavailable):
    """The shared store (Redis) cannot be reached: no resumable stream can start or be read (a 503)."""

    code = "stream_store_unavailable"


class StreamStore(Protocol):
    bounds: StoreBounds
    backend: str  # "memory", "redis": for /ready

    def create(self, stream_id: str) -> None:
        """Open an empty stream. Raises StoreFull at the total bound."""

    def append(self, stream_id: str, data: str, name: str | None = None) -> int:
        """Add one event; -> its id. Raises StreamGone when the stream was deleted or expired."""

    def finish(self, stream_id: str, data: str, name: str | None = None) -> int:
        """Append the stream's last event and mark it finished (one step, so no reader sees a gap)."""

    def read(self, stream_id: str, after: int) -> Slice:
        """The events with ids > ``after``. Counts as reader activity. Raises StreamGone."""

    def wait(self, stream_id: str, after: int, timeout: float) -> bool:
        """Block this greenlet until an event after ``after`` exists or the stream finished or went
        away (-> True), or ``timeout`` passed (-> False). Counts as reader activity."""

    def idle_s(self, stream_id: str) -> float:
        """Seconds since a reader last read or waited (since creation if none has). Raises StreamGone."""

    def delete(self, stream_id: str) -> bool:
        """Forget the stream now; waiting readers wake up. -> whether it existed."""

    def expire(self) -> list[str]:
        """Forget finished streams older than the retention time. -> their ids."""

    def keep(self, stream_ids: Iterable[str]) -> None:
        """These streams' work still runs here: do not let them expire (a shared store expires a
        running stream whose replica stopped renewing it)."""

    def ping(self) -> None:
        """Raises StoreUnavailable when the store cannot be reached."""

    def total_bytes(self) -> int: ...

    def __len__(self) -> int: ...


@dataclass(eq=False)
class _Stream:
    last_read_at: float  # a reader's last read or wait; the creation time until one comes
    # Kept events are events[head:]; dropping advances head (O(1)) and the list is compacted now and
    # then, so a reader's slice costs only what it returns.
    events: list[StoredEvent] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # UTF-8 size of each event's data
    head: int = 0
    bytes: int = 0
    last_id: int = 0
    dropped_through: int = 0  # every id up to this one was dropped from the buffer
    finished_at: float | None = None
    # Set (and replaced) at every change; readers wait on the one current when they looked.
    changed: gevent.event.Event = field(default_factory=gevent.event.Event)

    @property
    def kept(self) -> int:
        return len(self.events) - self.head

    def drop_oldest(self) -> int:
        """Forget the oldest kept event. -> its size."""
        self.dropped_through = self.events[self.head].id
        size = self.sizes[self.head]
        self.head += 1
        if self.head > 64 and self.head * 2 > len(self.events):
            del self.events[:self.head], self.sizes[:self.head]
            self.head = 0
        self.bytes -= size
        return size

    def after(self, event_id: int) -> list[StoredEvent]:
        """The kept events with ids > event_id (ids are consecutive, so the index is known)."""
        if self.kept == 0:
            return []
        first_kept = self.events[self.head].id
        return self.events[self.head + max(0, event_id + 1 - first_kept):]

    def notify(self) -> None:
        changed, self.changed = self.changed, gevent.event.Event()
        changed.set()


class MemoryStreamStore:
    """Streams in this worker's memory. Greenlet-safe: no method yields to the hub except ``wait``."""

    backend = "memory"

    def __init__(self, bounds: StoreBounds, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.bounds = bounds
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._total = 0

    def __len__(self) -> int:
        return len(self._streams)

    def total_bytes(self) -> int:
        return self._total

    def create(self, stream_id: str) -> None:
        self.expire()
        if self._total >= self.bounds.total_bytes:
            raise StoreFull(
                f"the stream replay buffers are full ({self.bounds.total_bytes} bytes, "
                "RIVULET_STREAM_TOTAL_BYTES); retry when older streams have expired",
                retry_after_s=max(1, int(self.bounds.retention_s)),
            )
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id!r} exists")
        self._streams[stream_id] = _Stream(last_read_at=self._clock())

    def append(self, stream_id: str, data: str, name: str | None = None) -> int:
        stream = self._live(stream_id)
        if stream.finished_at is not None:
            raise ValueError(f"stream {stream_id!r} is finished")
        stream.last_id += 1
        size = len(data.encode())
        stream.events.append(StoredEvent(stream.last_id, data, name))
        stream.sizes.append(size)
        stream.bytes += size
        self._total += size
        self._shed(stream)
        stream.notify()
        return stream.last_id

    def finish(self, stream_id: str, data: str, name: str | None = None) -> int:
        event_id = self.append(stream_id, data, name)
        stream = self._streams[stream_id]
        stream.finished_at = self._clock()
        return event_id

    def read(self, stream_id: str, after: int) -> Slice:
        stream = self._live(stream_id)
        stream.last_read_at = self._clock()
        dropped = None
        if after < stream.dropped_through:
            dropped = (after + 1, stream.dropped_through)
        return Slice(tuple(stream.after(after)), stream.last_id, stream.finished_at is not None, dropped)

    def wait(self, stream_id: str, after: int, timeout: float) -> bool:
        stream = self._live(stream_id)
        stream.last_read_at = self._clock()
        if stream.last_id > after or stream.finished_at is not None:
            return True
        woke = stream.changed.wait(timeout)
        if stream_id in self._streams:
            stream.last_read_at = self._clock()
        return bool(woke)

    def idle_s(self, stream_id: str) -> float:
        return self._clock() - self._live(stream_id).last_read_at

    def delete(self, stream_id: str) -> bool:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return False
        self._total -= stream.bytes
        stream.notify()  # a waiting reader wakes up and finds the stream gone
        return True

    def keep(self, stream_ids: Iterable[str]) -> None:
        pass  # running streams never expire here

    def ping(self) -> None:
        pass  # this process's memory is always there

    def expire(self) -> list[str]:
        cutoff = self._clock() - self.bounds.retention_s
        old = [sid for sid, s in self._streams.items()
               if s.finished_at is not None and s.finished_at <= cutoff]
        for sid in old:
            self.delete(sid)
        return old

    def _live(self, stream_id: str) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamGone(f"no stream {stream_id!r}: unknown, expired or deleted")
        if stream.finished_at is not None and stream.finished_at <= self._clock() - self.bounds.retention_s:
            self.delete(stream_id)
            raise StreamGone(f"stream {stream_id!r} expired")
        return stream

    def _shed(self, stream: _Stream) -> None:
        """Drop the stream's oldest events until it is within its bounds (the newest always stays)."""
        b = self.bounds
        while stream.kept > 1 and (
            stream.kept > b.max_events or stream.bytes > b.max_bytes or self._total > b.total_bytes
        ):
            self._total -= stream.drop_oldest()


def open_store(url: str, bounds: StoreBounds) -> StreamStore:
    """The store ``RIVULET_STREAM_STORE`` names: empty or ``memory`` for this worker's memory, a
    ``redis://``, ``rediss://`` or ``unix://`` URL for Redis (imported only then)."""
    if url in ("", "memory"):
        return MemoryStreamStore(bounds)
    from service.redis_stream_store import RedisStreamStore

    return RedisStreamStore(url, bounds)

"""This worker's resumable streams: the work pumped into the replay buffer, and the readers following it.

A resumable stream decouples generation from reading. ``open`` reserves a stream in the store, starts
the work (a ``service.jobs.Job``) and spawns a pump greenlet that appends each payload as it comes, so
the generation goes on while no reader is connected (a browser between two connections). ``follow``
is one reader: the events after the id it last saw, then new ones as they are appended, with
heartbeats while quiet; any number of readers may follow, each from its own position.

Lifetimes:
- A stream nobody reads for ``reader_grace_s`` is cancelled (its job aborted): readers refresh their
  presence in the store at least every ``reader_grace_s / 3`` while connected.
- ``cancel`` (DELETE) aborts the job and forgets the stream at once; its readers end with a
  ``cancelled`` error event and ``[DONE]``.
- Finished streams are forgotten by the store after its retention time; a sweeper greenlet runs while
  this worker has streams, expiring them, enforcing the grace time and telling the store which streams'
  work still runs here.

With a shared store (Redis) the stream may be read and cancelled through another replica: readers
there refresh the same presence, so the grace time counts readers on every replica, and a cancel there
deletes the stream, which this worker's pump finds at its next append (or the sweep within a second,
while the work waits in the queue) and aborts the work.
The store unreachable: ``open`` raises ``StoreUnavailable`` (503), ``follow`` raises it to its route,
and a pump that cannot append aborts its work (nobody could read it).
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gevent

from service import sse
from service.errors import stream_error_payload
from service.jobs import DONE, HEARTBEAT, Job
from service.stream_store import StoredEvent, StoreUnavailable, StreamGone, StreamStore

log = logging.getLogger("rivulet.streams")

SWEEP_INTERVAL_S = 1.0  # how often expiry and the reader grace time are checked
DONE_EVENT = "done"  # the SSE event name of a stream's last event


@dataclass(frozen=True, slots=True)
class Gap:
    """The reader asked for events the bounded buffer has already dropped: it cannot resume losslessly."""

    first: int
    last: int


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


GONE = _Marker("GONE")  # the stream was deleted (cancelled) while this reader followed it
DROPPED = _Marker("DROPPED")  # a test hook asked this reader's connection to end abruptly

ReaderItem = StoredEvent | Gap | _Marker | type(HEARTBEAT)


@dataclass(eq=False)
class _Reader:
    dropped: bool = False


@dataclass(eq=False)
class _Pump:
    job: Job
    greenlet: gevent.Greenlet | None = None


class ResumableStreams:
    def __init__(self, store: StreamStore, *, reader_grace_s: float, heartbeat_s: float) -> None:
        self.store = store
        self.reader_grace_s = reader_grace_s
        self.heartbeat_s = heartbeat_s
        self._pumps: dict[str, _Pump] = {}  # streams whose work runs in this worker
        self._readers: dict[str, set[_Reader]] = {}  # connections following each stream here
        self._sweeper: gevent.Greenlet | None = None

    # --- the work -----------------------------------------------------------------------------

    def open(self, start_job: Callable[[], Job]) -> str:
        """Reserve a stream, start its work, pump it. -> the stream's id (unguessable: it is the
        reader's capability). Raises StoreFull at the total bound and whatever ``start_job`` raises
        (invalid body, full queue...), before any work is left running."""
        stream_id = secrets.token_urlsafe(24)
        self.store.create(stream_id)
        try:
            job = start_job()
        except BaseException:
            self.store.delete(stream_id)
            raise
        pump = _Pump(job)
        self._pumps[stream_id] = pump
        pump.greenlet = gevent.spawn(self._pump, stream_id, job)
        self._ensure_sweeper()
        return stream_id

    def job(self, stream_id: str) -> Job | None:
        """The stream's job while it runs in this worker."""
        pump = self._pumps.get(stream_id)
        return pump.job if pump else None

    def cancel(self, stream_id: str) -> bool:
        """Abort the stream's work and forget it. -> whether it existed."""
        pump = self._pumps.get(stream_id)
        if pump is not None:
            pump.job.abort("cancelled")
        return self.store.delete(stream_id)

    def wait_for_work(self, timeout: float) -> int:
        """Block until every stream's work in this worker has ended (finished, or ended by the engine's
        shutdown) and its last events are stored, or ``timeout`` passed. -> how many still run."""
        gevent.joinall([p.greenlet for p in list(self._pumps.values()) if p.greenlet is not None],
                       timeout=timeout)
        return len(self._pumps)

    def _pump(self, stream_id: str, job: Job) -> None:
        try:
            for payload in job:
                if payload is HEARTBEAT:
                    continue
                if payload == DONE:
                    self.store.finish(stream_id, DONE, DONE_EVENT)
                    return
                self.store.append(stream_id, sse.encode_json(payload))
        except StreamGone:
            pass  # deleted or expired while running: nobody can read it, so the work stops (finally)
        except StoreUnavailable as exc:
            log.warning("stream %s: cancelled, the store is unreachable: %s", stream_id, exc.message)
        except Exception as exc:  # a bug here must still end the stream for its readers
            log.exception("stream %s: pumping failed", stream_id)
            with contextlib.suppress(StreamGone, ValueError):
                self.store.append(stream_id, sse.encode_json(stream_error_payload(exc)))
                self.store.finish(stream_id, DONE, DONE_EVENT)
        finally:
            job.close()  # aborts the engine's work unless the stream finished
            self._pumps.pop(stream_id, None)

    # --- readers ------------------------------------------------------------------------------

    def follow(self, stream_id: str, after: int) -> Iterator[ReaderItem]:
        """One reader's items: stored events after ``after`` in order, HEARTBEAT when quiet for
        ``heartbeat_s``, and at the end possibly one of Gap, GONE or DROPPED. Ends after the last event.
        Raises StoreUnavailable when the store cannot be reached."""
        reader = _Reader()
        self._readers.setdefault(stream_id, set()).add(reader)
        # Waits are cut into slices so a connected reader's presence never looks older than the grace.
        presence_slice = self.reader_grace_s / 3
        try:
            last_sent = time.monotonic()
            while True:
                try:
                    chunk = self.store.read(stream_id, after)
                except StreamGone:
                    yield GONE
                    return
                if chunk.dropped is not None:
                    yield Gap(*chunk.dropped)
                    return
                for event in chunk.events:
                    if reader.dropped:
                        yield DROPPED
                        return
                    yield event
                    after = event.id
                    last_sent = time.monotonic()
                if chunk.finished and after >= chunk.last_id:
                    return
                if reader.dropped:
                    yield DROPPED
                    return
                quiet = time.monotonic() - last_sent
                if quiet >= self.heartbeat_s:
                    yield HEARTBEAT
                    last_sent = time.monotonic()
                    continue
                try:
                    self.store.wait(stream_id, after, min(self.heartbeat_s - quiet, presence_slice))
                except StreamGone:
                    yield GONE
                    return
        finally:
            readers = self._readers.get(stream_id)
            if readers is not None:
                readers.discard(reader)
                if not readers:
                    del self._readers[stream_id]

    def drop_readers(self, stream_id: str) -> int:
        """Test hook: make the stream's current connections end without their last event, as a network
        drop would; each ends at its next event (or wait slice). -> how many were told."""
        readers = self._readers.get(stream_id, set())
        for reader in readers:
            reader.dropped = True
        return len(readers)

    # --- upkeep -------------------------------------------------------------------------------

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.dead:
            self._sweeper = gevent.spawn(self._sweep_while_needed)

    def _sweep_while_needed(self) -> None:
        while self._pumps or self._store_has_streams():
            gevent.sleep(SWEEP_INTERVAL_S)
            try:
                self.sweep()
            except StoreUnavailable as exc:
                log.warning("stream upkeep skipped: %s", exc.message)

    def _store_has_streams(self) -> bool:
        try:
            return len(self.store) > 0
        except StoreUnavailable:
            return False  # the next open() (which needs the store back) starts the sweeper again

    def sweep(self) -> None:
        """Forget expired streams; cancel running ones that nobody has read for the grace time."""
        self.store.expire()
        self.store.keep(list(self._pumps))
        for stream_id, pump in list(self._pumps.items()):
            try:
                idle = self.store.idle_s(stream_id)
            except StreamGone:
                pump.job.abort("cancelled")
                continue
            if idle > self.reader_grace_s:
                log.info("stream %s: no reader for %.0fs, cancelling", stream_id, idle)
                pump.job.abort("cancelled")

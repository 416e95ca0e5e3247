"""Resumable streams without the engine: a stand-in job fed by the test, the real store and pump."""
from __future__ import annotations

import json
import time

import gevent
import gevent.queue
import pytest

from models.errors import InvalidRequest
from service.errors import cancelled_payload
from service.jobs import DONE, HEARTBEAT
from service.resumable import DROPPED, GONE, Gap, ResumableStreams
from service.stream_store import MemoryStreamStore, StoreBounds, StoredEvent, StoreFull, StreamGone


class FakeJob:
    """Plays service.jobs.Job's part: yields what the test feeds; an abort ends it like the engine does,
    with a cancelled error payload and DONE."""

    def __init__(self) -> None:
        self.payloads: gevent.queue.Queue = gevent.queue.Queue()
        self.aborted: str | None = None
        self.finished = False

    def feed(self, *payloads) -> None:
        for payload in payloads:
            self.payloads.put(payload)

    def __iter__(self):
        while True:
            payload = self.payloads.get()
            yield payload
            if payload == DONE:
                self.finished = True
                return

    def abort(self, reason: str = "cancelled") -> None:
        if self.finished or self.aborted:
            return
        self.aborted = reason
        self.feed(cancelled_payload(), DONE)

    def close(self) -> None:
        self.abort()


def chunk(text: str) -> dict:
    return {"choices": [{"delta": {"content": text}}]}


def make(**kwargs) -> ResumableStreams:
    bounds = kwargs.pop("bounds", StoreBounds())
    clock = kwargs.pop("clock", time.monotonic)
    options = {"reader_grace_s": 30.0, "heartbeat_s": 15.0, **kwargs}
    return ResumableStreams(MemoryStreamStore(bounds, clock=clock), **options)


def start(streams: ResumableStreams) -> tuple[str, FakeJob]:
    job = FakeJob()
    return streams.open(lambda: job), job


def settle() -> None:
    """Let the pump greenlet move what was fed into the store."""
    gevent.sleep(0.01)


def texts(items) -> list[str]:
    return [json.loads(i.data)["choices"][0]["delta"]["content"]
            for i in items if isinstance(i, StoredEvent) and i.name is None]


def test_a_reader_gets_every_event_in_order_and_the_done_event_last():
    streams = make()
    stream_id, job = start(streams)
    job.feed(chunk("a"), chunk("b"))
    reader = gevent.spawn(lambda: list(streams.follow(stream_id, 0)))
    settle()
    job.feed(chunk("c"), DONE)
    items = reader.get(timeout=10)
    assert texts(items) == ["a", "b", "c"]
    assert [i.id for i in items] == [1, 2, 3, 4]
    assert (items[-1].name, items[-1].data) == ("done", "[DONE]")


def test_generation_goes_on_without_a_reader_and_a_late_reader_resumes_after_its_last_id():
    streams = make()
    stream_id, job = start(streams)
    job.feed(*(chunk(c) for c in "hello"), DONE)
    settle()
    assert streams.job(stream_id) is None  # the pump is done: all of it is in the store
    assert texts(streams.follow(stream_id, 2)) == ["l", "l", "o"]
    assert texts(streams.follow(stream_id, 0)) == list("hello")


def test_payloads_are_stored_as_single_line_json():
    streams = make()
    stream_id, job = start(streams)
    job.feed(chunk("line one\nline two\r\n"), DONE)
    settle()
    first = next(iter(streams.follow(stream_id, 0)))
    assert "\n" not in first.data and "\r" not in first.data
    assert json.loads(first.data) == chunk("line one\nline two\r\n")


def test_a_stream_nobody_reads_for_the_grace_time_is_cancelled():
    now = [1000.0]
    streams = make(reader_grace_s=30.0, clock=lambda: now[0])  # the store's clock: no real waiting
    stream_id, job = start(streams)
    job.feed(chunk("a"))
    settle()
    now[0] += 29.0
    streams.sweep()
    settle()
    assert job.aborted is None  # within the grace time
    now[0] += 2.0
    streams.sweep()
    settle()
    assert job.aborted == "cancelled"
    items = list(streams.follow(stream_id, 0))
    assert json.loads(items[-2].data) == cancelled_payload()
    assert items[-1].name == "done"


def test_a_connected_reader_keeps_its_stream_alive_past_the_grace_time():
    streams = make(reader_grace_s=0.15)
    stream_id, job = start(streams)
    reader = gevent.spawn(lambda: list(streams.follow(stream_id, 0)))
    for _ in range(6):  # 0.3 s, twice the grace, with no event at all
        gevent.sleep(0.05)
        streams.sweep()
    assert job.aborted is None
    job.feed(chunk("x"), DONE)
    assert texts(reader.get(timeout=10)) == ["x"]


def test_cancel_aborts_the_work_forgets_the_stream_and_ends_its_readers():
    streams = make()
    stream_id, job = start(streams)
    job.feed(chunk("a"))
    reader = gevent.spawn(lambda: list(streams.follow(stream_id, 0)))
    settle()
    assert streams.cancel(stream_id) is True
    assert job.aborted == "cancelled"
    items = reader.get(timeout=10)
    assert texts(items) == ["a"] and items[-1] is GONE
    with pytest.raises(StreamGone):
        streams.store.read(stream_id, 0)
    assert streams.cancel(stream_id) is False
    settle()
    assert streams.job(stream_id) is None


def test_drop_readers_ends_current_connections_mid_stream_and_a_resume_loses_nothing():
    streams = make()
    stream_id, job = start(streams)
    seen: list = []

    def read(after: int) -> None:
        for item in streams.follow(stream_id, after):
            seen.append(item)

    first = gevent.spawn(read, 0)
    job.feed(chunk("a"), chunk("b"))
    settle()
    assert streams.drop_readers(stream_id) == 1
    job.feed(chunk("c"))
    first.get(timeout=10)
    assert seen[-1] is DROPPED
    last_id = [i for i in seen if isinstance(i, StoredEvent)][-1].id
    second = gevent.spawn(read, last_id)
    job.feed(chunk("d"), DONE)
    second.get(timeout=10)
    assert texts(seen) == ["a", "b", "c", "d"]
    assert streams.drop_readers(stream_id) == 0


def test_a_reader_behind_the_bounds_is_told_of_the_gap_instead_of_skipping_it():
    streams = make(bounds=StoreBounds(max_events=3))
    stream_id, job = start(streams)
    job.feed(*(chunk(str(n)) for n in range(10)), DONE)
    settle()
    items = list(streams.follow(stream_id, 0))
    assert items == [Gap(1, 8)]
    assert texts(streams.follow(stream_id, 8)) == ["8", "9"]


def test_a_quiet_stream_sends_heartbeats_to_its_reader():
    streams = make(heartbeat_s=0.02)
    stream_id, job = start(streams)
    follower = streams.follow(stream_id, 0)
    assert next(follower) is HEARTBEAT
    job.feed(chunk("z"))
    assert texts([next(follower)]) == ["z"]
    follower.close()
    assert streams.drop_readers(stream_id) == 0  # a closed reader is unregistered


def test_a_refused_job_leaves_no_stream_behind():
    streams = make()

    def refuse():
        raise InvalidRequest("bad body")

    with pytest.raises(InvalidRequest):
        streams.open(refuse)
    assert len(streams.store) == 0


def test_a_full_store_refuses_before_any_work_starts():
    streams = make(bounds=StoreBounds(total_bytes=10))
    stream_id, job = start(streams)
    job.feed(chunk("more than ten bytes"))
    settle()
    started = []
    with pytest.raises(StoreFull):
        streams.open(lambda: started.append(1) or FakeJob())
    assert started == []


def test_wait_for_work_returns_once_every_pump_has_stored_its_last_event():
    streams = make()
    stream_id, job = start(streams)
    assert streams.wait_for_work(timeout=0.05) == 1  # still running: the wait gives up
    gevent.spawn_later(0.05, job.feed, chunk("a"), DONE)
    assert streams.wait_for_work(timeout=10) == 0
    assert streams.store.read(stream_id, 0).finished

"""The in-memory replay buffer: resume semantics, bounds under pressure, expiry, waking readers."""
from __future__ import annotations

import gevent
import pytest

from service.stream_store import MemoryStreamStore, StoreBounds, StoreFull, StreamGone


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_store(clock: FakeClock, **bounds) -> MemoryStreamStore:
    return MemoryStreamStore(StoreBounds(**bounds), clock=clock)


def ids(events) -> list[int]:
    return [e.id for e in events]


def test_ids_are_consecutive_and_read_resumes_after_the_given_id(clock):
    store = make_store(clock)
    store.create("s")
    assert [store.append("s", f'{{"n": {n}}}') for n in range(5)] == [1, 2, 3, 4, 5]
    assert ids(store.read("s", 0).events) == [1, 2, 3, 4, 5]
    resumed = store.read("s", 3)
    assert ids(resumed.events) == [4, 5]
    assert [e.data for e in resumed.events] == ['{"n": 3}', '{"n": 4}']
    assert resumed.last_id == 5 and not resumed.finished and resumed.dropped is None
    assert store.read("s", 5).events == ()


def test_finish_appends_the_named_last_event_and_marks_the_stream_finished(clock):
    store = make_store(clock)
    store.create("s")
    store.append("s", "a")
    assert store.finish("s", "[DONE]", "done") == 2
    tail = store.read("s", 1)
    assert tail.finished and tail.last_id == 2
    assert [(e.data, e.name) for e in tail.events] == [("[DONE]", "done")]
    with pytest.raises(ValueError):
        store.append("s", "late")


def test_unknown_and_deleted_streams_are_gone(clock):
    store = make_store(clock)
    with pytest.raises(StreamGone):
        store.read("nope", 0)
    store.create("s")
    store.append("s", "abc")
    assert store.delete("s") is True
    assert store.delete("s") is False
    assert store.total_bytes() == 0 and len(store) == 0
    with pytest.raises(StreamGone):
        store.read("s", 0)
    with pytest.raises(StreamGone):
        store.append("s", "more")


def test_event_bound_drops_the_oldest_and_reports_the_gap(clock):
    store = make_store(clock, max_events=4)
    store.create("s")
    for n in range(10):
        store.append("s", str(n))
        assert len(store.read("s", 0).events) <= 4
    behind = store.read("s", 2)
    assert behind.dropped == (3, 6)
    assert ids(behind.events) == [7, 8, 9, 10]
    caught_up = store.read("s", 6)
    assert caught_up.dropped is None and ids(caught_up.events) == [7, 8, 9, 10]


def test_byte_bound_per_stream_holds_and_counts_utf8_bytes(clock):
    store = make_store(clock, max_bytes=100)
    store.create("s")
    for _ in range(50):
        store.append("s", "é" * 10)  # 20 bytes each
        assert store.total_bytes() <= 100
    kept = store.read("s", 0)
    assert len(kept.events) == 5 and kept.dropped == (1, 45)


def test_the_newest_event_is_kept_even_when_alone_it_passes_the_bound(clock):
    store = make_store(clock, max_bytes=10)
    store.create("s")
    store.append("s", "x" * 50)
    assert [e.data for e in store.read("s", 0).events] == ["x" * 50]
    store.append("s", "y")
    assert ids(store.read("s", 0).events) == [2]


def test_total_bound_sheds_the_appending_streams_history_and_refuses_new_streams(clock):
    store = make_store(clock, total_bytes=1000)
    names = [f"s{i}" for i in range(4)]
    for name in names:
        store.create(name)
    newest: dict[str, int] = {}
    for n in range(400):  # 400 * 10 bytes: four times the bound
        name = names[n % len(names)]
        store.append(name, f"{n:010d}")
        newest[name] = 10
        # At most one event per stream (its newest, which a reader may still need) passes the bound.
        assert store.total_bytes() <= 1000 + sum(newest.values())
    assert store.total_bytes() >= 1000
    with pytest.raises(StoreFull) as refused:
        store.create("one-more")
    assert refused.value.retry_after_s >= 1
    store.delete("s0")
    store.create("one-more")


def test_finished_streams_are_kept_for_the_retention_time_then_forgotten(clock):
    store = make_store(clock, retention_s=300)
    store.create("done")
    store.create("running")
    store.append("running", "r")
    store.finish("done", "[DONE]", "done")
    clock.now += 299
    assert store.read("done", 0).finished
    assert store.expire() == []
    clock.now += 2
    with pytest.raises(StreamGone):  # expiry applies at access too, not only at the sweep
        store.read("done", 0)
    store.create("done2")
    store.finish("done2", "[DONE]", "done")
    clock.now += 301
    assert store.expire() == ["done2"]
    assert ids(store.read("running", 0).events) == [1]  # unfinished streams do not expire
    assert store.total_bytes() == 1 and len(store) == 1


def test_readers_activity_resets_idle_time(clock):
    store = make_store(clock)
    store.create("s")
    clock.now += 7
    assert store.idle_s("s") == 7
    store.read("s", 0)
    assert store.idle_s("s") == 0
    clock.now += 3
    store.wait("s", 0, timeout=0)
    assert store.idle_s("s") == 0


def test_wait_wakes_on_append_finish_and_delete_and_times_out_otherwise():
    store = MemoryStreamStore(StoreBounds())
    store.create("s")
    assert store.wait("s", 0, timeout=0.01) is False

    gevent.spawn_later(0.01, store.append, "s", "a")
    assert store.wait("s", 0, timeout=30) is True
    assert store.wait("s", 0, timeout=0) is True  # already newer than 0: no blocking

    gevent.spawn_later(0.01, store.finish, "s", "[DONE]", "done")
    assert store.wait("s", 1, timeout=30) is True
    assert store.read("s", 1).finished

    store.create("t")
    gevent.spawn_later(0.01, store.delete, "t")
    assert store.wait("t", 0, timeout=30) is True
    with pytest.raises(StreamGone):
        store.read("t", 0)


def test_many_readers_wait_on_one_stream():
    store = MemoryStreamStore(StoreBounds())
    store.create("s")
    readers = [gevent.spawn(store.wait, "s", 0, 30) for _ in range(3)]
    gevent.sleep(0)
    store.append("s", "a")
    gevent.joinall(readers, timeout=30)
    assert [r.value for r in readers] == [True, True, True]

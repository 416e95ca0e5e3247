"""The replay buffer, in memory and in Redis: resume semantics, bounds under pressure, expiry, waking
readers. The contract tests run against both stores (Redis: a real redis-server on a loopback port);
what needs a fake clock runs on the memory store, and its Redis twin uses short real times."""
from __future__ import annotations

import threading
import time
import uuid

import gevent
import pytest

from service.stream_store import MemoryStreamStore, StoreBounds, StoreFull, StoreUnavailable, StreamGone


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


class Stores:
    """Makes stores of one kind. Redis: each test has its own key prefix, and ``replica()`` is a second
    client on the same keys, as another replica would be. ``later(delay, fn, *args)`` runs ``fn`` while
    the test blocks in a wait: a greenlet for the memory store, a thread for Redis (redis-py's sockets
    are not gevent's here: pytest does not monkey-patch)."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.prefix = f"test:{uuid.uuid4().hex}"
        self.made: list = []

    def __call__(self, **bounds):
        if self.kind == "memory":
            return MemoryStreamStore(StoreBounds(**bounds))
        from service.redis_stream_store import RedisStreamStore

        store = RedisStreamStore(self.redis_url, StoreBounds(**bounds), prefix=self.prefix)
        self.made.append(store)
        return store

    def replica(self, store):
        return store if self.kind == "memory" else self(**vars(store.bounds))

    def later(self, delay: float, fn, *args) -> None:
        if self.kind == "memory":
            gevent.spawn_later(delay, fn, *args)
        else:
            timer = threading.Timer(delay, fn, args)
            timer.daemon = True
            timer.start()

    def concurrently(self, fn, *args):
        """Start ``fn`` now; -> a function that returns its result."""
        if self.kind == "memory":
            greenlet = gevent.spawn(fn, *args)
            return lambda: greenlet.get(timeout=30)
        result: list = []
        thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
        thread.start()

        def get():
            thread.join(30)
            return result[0]
        return get

    def yield_to_others(self) -> None:
        if self.kind == "memory":
            gevent.sleep(0)
        else:
            time.sleep(0.1)


@pytest.fixture(params=["memory", "redis"])
def stores(request) -> Stores:
    redis_url = request.getfixturevalue("redis_service").url if request.param == "redis" else None
    made = Stores(request.param, redis_url)
    yield made
    for store in made.made:
        store.close()


def test_ids_are_consecutive_and_read_resumes_after_the_given_id(stores):
    store = stores()
    store.create("s")
    assert [store.append("s", f'{{"n": {n}}}') for n in range(5)] == [1, 2, 3, 4, 5]
    assert ids(store.read("s", 0).events) == [1, 2, 3, 4, 5]
    resumed = store.read("s", 3)
    assert ids(resumed.events) == [4, 5]
    assert [e.data for e in resumed.events] == ['{"n": 3}', '{"n": 4}']
    assert resumed.last_id == 5 and not resumed.finished and resumed.dropped is None
    assert store.read("s", 5).events == ()


def test_finish_appends_the_named_last_event_and_marks_the_stream_finished(stores):
    store = stores()
    store.create("s")
    store.append("s", "a")
    assert store.finish("s", "[DONE]", "done") == 2
    tail = store.read("s", 1)
    assert tail.finished and tail.last_id == 2
    assert [(e.data, e.name) for e in tail.events] == [("[DONE]", "done")]
    with pytest.raises(ValueError):
        store.append("s", "late")


def test_unknown_and_deleted_streams_are_gone(stores):
    store = stores()
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


def test_event_bound_drops_the_oldest_and_reports_the_gap(stores):
    store = stores(max_events=4)
    store.create("s")
    for n in range(10):
        store.append("s", str(n))
        assert len(store.read("s", 0).events) <= 4
    behind = store.read("s", 2)
    assert behind.dropped == (3, 6)
    assert ids(behind.events) == [7, 8, 9, 10]
    caught_up = store.read("s", 6)
    assert caught_up.dropped is None and ids(caught_up.events) == [7, 8, 9, 10]


def test_byte_bound_per_stream_holds_and_counts_utf8_bytes(stores):
    store = stores(max_bytes=100)
    store.create("s")
    for _ in range(50):
        store.append("s", "é" * 10)  # 20 bytes each
        assert store.total_bytes() <= 100
    kept = store.read("s", 0)
    assert len(kept.events) == 5 and kept.dropped == (1, 45)


def test_the_newest_event_is_kept_even_when_alone_it_passes_the_bound(stores):
    store = stores(max_bytes=10)
    store.create("s")
    store.append("s", "x" * 50)
    assert [e.data for e in store.read("s", 0).events] == ["x" * 50]
    store.append("s", "y")
    assert ids(store.read("s", 0).events) == [2]


def test_total_bound_sheds_the_appending_streams_history_and_refuses_new_streams(stores):
    store = stores(total_bytes=1000)
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


def test_wait_wakes_on_append_finish_and_delete_and_times_out_otherwise(stores):
    store = stores()
    writer = stores.replica(store)  # with Redis, another replica's client does the writing
    store.create("s")
    assert store.wait("s", 0, timeout=0.01) is False

    stores.later(0.01, writer.append, "s", "a")
    assert store.wait("s", 0, timeout=30) is True
    assert store.wait("s", 0, timeout=0) is True  # already newer than 0: no blocking

    stores.later(0.01, writer.finish, "s", "[DONE]", "done")
    assert store.wait("s", 1, timeout=30) is True
    assert store.read("s", 1).finished

    store.create("t")
    stores.later(0.01, writer.delete, "t")
    assert store.wait("t", 0, timeout=30) is True
    with pytest.raises(StreamGone):
        store.read("t", 0)


def test_many_readers_wait_on_one_stream(stores):
    store = stores()
    store.create("s")
    readers = [stores.concurrently(stores.replica(store).wait, "s", 0, 30) for _ in range(3)]
    stores.yield_to_others()
    store.append("s", "a")
    assert [get() for get in readers] == [True, True, True]


# --- Redis only: real time instead of the fake clock, several replicas, Redis down --------------------


@pytest.fixture
def redis_stores(redis_service) -> Stores:
    made = Stores("redis", redis_service.url)
    yield made
    for store in made.made:
        store.close()


def test_redis_finished_streams_expire_after_the_retention_time_and_running_ones_are_kept(redis_stores):
    store = redis_stores(retention_s=0.5)
    store.create("done")
    store.create("running")
    store.create("orphan")  # its replica died: nobody keeps it
    store.append("running", "r")
    store.finish("done", "[DONE]", "done")
    assert store.read("done", 0).finished
    for _ in range(4):  # 0.8 s: past the retention
        time.sleep(0.2)
        store.keep(["running", "done"])  # a finished stream is not kept alive by this
    with pytest.raises(StreamGone):  # the keys' TTL: gone at access even before the sweep
        store.read("done", 0)
    assert sorted(store.expire()) == ["done", "orphan"]
    assert ids(store.read("running", 0).events) == [1]
    assert store.total_bytes() == 1 and len(store) == 1


def test_redis_every_key_has_a_ttl(redis_stores, redis_service):
    import redis

    store = redis_stores(retention_s=60)
    store.create("s")
    store.append("s", "a")
    store.create("t")
    store.delete("t")
    client = redis.Redis.from_url(redis_service.url)
    keys = list(client.scan_iter(f"{redis_stores.prefix}:*"))
    assert len(keys) >= 5  # meta, events, index, bytes, total (and t's tombstone)
    assert all(0 < client.pttl(key) <= 60_000 for key in keys), {k: client.pttl(k) for k in keys}
    client.close()


def test_redis_a_reader_on_another_replica_counts_as_presence(redis_stores):
    producer = redis_stores()
    reader = redis_stores.replica(producer)
    producer.create("s")
    time.sleep(0.3)
    assert producer.idle_s("s") >= 0.25
    reader.read("s", 0)
    assert producer.idle_s("s") < 0.25
    time.sleep(0.3)
    reader.wait("s", 0, timeout=0)
    assert producer.idle_s("s") < 0.25


def test_redis_a_delete_through_another_replica_stops_the_producers_appends(redis_stores):
    producer = redis_stores()
    other = redis_stores.replica(producer)
    producer.create("s")
    producer.append("s", "a")
    assert other.read("s", 0).last_id == 1  # the other replica sees the same stream
    assert other.delete("s") is True
    with pytest.raises(StreamGone):
        producer.append("s", "b")
    with pytest.raises(StreamGone):
        producer.idle_s("s")
    assert producer.total_bytes() == 0 and len(producer) == 0


def test_redis_unreachable_is_store_unavailable_without_the_password():  # no server needed
    from tests.live_server import free_port

    from service.redis_stream_store import RedisStreamStore

    down = RedisStreamStore(f"redis://:hunter2@127.0.0.1:{free_port()}/0", StoreBounds())
    for call in (down.ping, lambda: down.create("s"), lambda: down.read("s", 0), lambda: len(down)):
        with pytest.raises(StoreUnavailable) as refused:
            call()
        assert "unreachable" in refused.value.message and "hunter2" not in refused.value.message
        assert refused.value.code == "stream_store_unavailable"
    down.close()


def test_redis_a_running_stream_nobody_renews_expires_after_its_lease(redis_stores, monkeypatch):
    from service import redis_stream_store

    monkeypatch.setattr(redis_stream_store, "RUNNING_LEASE_S", 0.3)
    store = redis_stores(retention_s=60)
    for name in ("kept", "orphan", "done"):
        store.create(name)
    store.finish("done", "[DONE]", "done")
    for _ in range(4):  # 0.8 s: past the lease, far from the retention
        time.sleep(0.2)
        store.keep(["kept"])
    with pytest.raises(StreamGone):  # its replica died: its readers learn it within the lease
        store.read("orphan", 0)
    assert store.read("done", 0).finished  # finished streams keep the retention time
    assert store.read("kept", 0).last_id == 0
    assert store.expire() == ["orphan"]

"""How a stream's payloads become writes: one event a write while the stream keeps up with the engine,
every event already waiting in one write once it has fallen behind, a hang-up stopping it before a write."""
from __future__ import annotations

import time
from types import SimpleNamespace

from models.api import Finished, TextDelta
from service import sse
from service.channel import Bridge
from service.jobs import Job
from service.metrics import Metrics
from service.openai_stream import COMPLETION, ResponseShape
from service.responses import MAX_EVENTS_PER_WRITE, stream_writes
from tests.sse_client import events_from_bytes, payloads


def job_with(bridge: Bridge, events: list) -> Job:
    """A completion job whose engine has already delivered ``events`` into its channel."""
    runtime = SimpleNamespace(engine=SimpleNamespace(abort=lambda ticket, reason: None),
                              metrics=Metrics(running=lambda: 0, waiting=lambda: 0),
                              settings=SimpleNamespace(heartbeat_s=15.0), bridge=bridge)
    now = time.monotonic()
    job = Job(runtime, "r", COMPLETION, now, now + 60, stream=True, shape=ResponseShape(COMPLETION, "r", "m"))
    job._channel, job._ticket = bridge.channel(), object()  # what Job._submit does, without an engine
    for event in events:
        job._channel._queue.put_nowait(event)  # as Bridge._deliver does on the hub
    return job


def texts(write: bytes) -> list[str]:
    return [p["choices"][0]["text"] for p in payloads(events_from_bytes(write)) if p != sse.DONE]


def test_events_already_waiting_leave_in_one_write_with_their_own_ids():
    bridge = Bridge()
    deltas = [TextDelta(f" w{i}", i + 1) for i in range(5)]
    writes = list(stream_writes(job_with(bridge, [*deltas, Finished("length", 3, 5)]), sse.EventIds(), lambda: False))
    assert texts(writes[0]) == [" w0", " w1", " w2", " w3", " w4", ""]  # the last: the finish_reason chunk
    assert [e.id for e in events_from_bytes(b"".join(writes))] == [str(i) for i in range(1, 8)]
    assert payloads(events_from_bytes(writes[-1])) == [sse.DONE]
    bridge.close()


def test_a_stream_that_keeps_up_writes_each_event_alone():
    bridge = Bridge()
    job = job_with(bridge, [])
    writes = stream_writes(job, sse.EventIds(), lambda: False)
    for i in range(3):
        job._channel._queue.put_nowait(TextDelta(f" w{i}", i + 1))
        assert texts(next(writes)) == [f" w{i}"]
    bridge.close()


def test_one_write_holds_at_most_max_events_per_write():
    bridge = Bridge()
    count = MAX_EVENTS_PER_WRITE + 10
    job = job_with(bridge, [TextDelta(" w", i + 1) for i in range(count)] + [Finished("length", 3, count)])
    writes = list(stream_writes(job, sse.EventIds(), lambda: False))
    assert [len(texts(w)) for w in writes[:2]] == [MAX_EVENTS_PER_WRITE, 11]  # 10 deltas and the final chunk
    bridge.close()


def test_a_hang_up_stops_the_writes_before_the_next_one():
    bridge = Bridge()
    hung_up = [False]
    job = job_with(bridge, [])
    writes = stream_writes(job, sse.EventIds(), lambda: hung_up[0])
    job._channel._queue.put_nowait(TextDelta(" a", 1))
    assert texts(next(writes)) == [" a"]
    hung_up[0] = True
    job._channel._queue.put_nowait(TextDelta(" b", 2))
    assert list(writes) == []
    bridge.close()

"""The scheduler and the engine loop with a fake backend: no model, only the order of work."""
from __future__ import annotations

import time

import pytest

from models.api import Finished, TextDelta
from models.engine import Engine
from models.errors import EngineUnavailable, ModelError, QueueFull, RequestTimeout, Shutdown
from models.scheduler import FINISHED, RUNNING, WAITING, Scheduler, Ticket
from tests.models.support import RecordingSink, request, running_engine, wait_for


def ticket(deadline_s: float = 60.0) -> Ticket:
    return Ticket(request([1, 2, 3], deadline_s=deadline_s), RecordingSink())


class Releases:
    def __init__(self):
        self.released = []

    def __call__(self, t):
        self.released.append(t)


def test_admits_in_order_up_to_max_batch():
    scheduler = Scheduler(max_batch=2)
    tickets = [ticket() for _ in range(3)]
    for t in tickets:
        scheduler.add(t)
    assert scheduler.admit() == tickets[:2]
    assert scheduler.admit() == []
    assert [t.state for t in tickets] == [RUNNING, RUNNING, WAITING]
    scheduler.finish(tickets[0], "stop")
    assert scheduler.admit() == [tickets[2]]
    assert scheduler.left_waiting == 3


def test_reap_ends_cancelled_and_timed_out_requests_waiting_or_running():
    releases = Releases()
    scheduler = Scheduler(max_batch=2, on_release=releases)
    running_cancelled, running_late, waiting_cancelled, waiting_late, fine = (
        ticket(), ticket(deadline_s=-1), ticket(), ticket(deadline_s=-1), ticket())
    for t in (running_cancelled, running_late):
        scheduler.add(t)
    scheduler.admit()
    for t in (waiting_cancelled, waiting_late, fine):
        scheduler.add(t)
    running_cancelled.cancel_reason = waiting_cancelled.cancel_reason = "cancelled"
    assert scheduler.reap(time.monotonic()) == 4
    assert releases.released == [running_cancelled, running_late]  # only running ones hold a slot
    for t, reason in [(running_cancelled, "cancelled"), (waiting_cancelled, "cancelled"),
                      (running_late, "timeout"), (waiting_late, "timeout")]:
        assert t.sink.finished.reason == reason and t.state == FINISHED
    assert isinstance(running_late.sink.finished.error, RequestTimeout)
    assert running_cancelled.sink.finished.error is None
    assert list(scheduler.waiting) == [fine] and scheduler.running == []


def test_finish_sends_one_finished_even_when_called_twice():
    scheduler = Scheduler(max_batch=1)
    t = ticket()
    scheduler.add(t)
    scheduler.admit()
    t.prompt_tokens, t.completion_tokens = 3, 5
    scheduler.finish(t, "length")
    scheduler.finish(t, "error", ModelError("late"))
    assert t.sink.events == [Finished("length", 3, 5, None)]


def test_finished_goes_out_even_when_freeing_the_slot_fails():
    def broken_release(t):
        raise RuntimeError("device lost")

    scheduler = Scheduler(max_batch=1, on_release=broken_release)
    t = ticket()
    scheduler.add(t)
    scheduler.admit()
    with pytest.raises(RuntimeError, match="device lost"):
        scheduler.finish(t, "stop")
    assert t.sink.finished.reason == "stop" and scheduler.running == []


def test_finish_all_ends_running_and_waiting():
    scheduler = Scheduler(max_batch=1)
    a, b = ticket(), ticket()
    scheduler.add(a)
    scheduler.add(b)
    scheduler.admit()
    scheduler.finish_all("shutdown")
    for t in (a, b):
        assert t.sink.finished.reason == "shutdown" and isinstance(t.sink.finished.error, Shutdown)
    assert not scheduler.has_work()


# --- the engine loop, with a backend that needs no model ----------------------------------------

class CountingBackend:
    """Each step gives every running request one "x"; a request ends after ``tokens`` of them.

    ``hold`` keeps requests running (no output) until the test lets them go."""

    kind, name = "llm", "counting"

    def __init__(self, tokens: int = 3, fail_load: bool = False):
        self.tokens = tokens
        self.fail_load = fail_load
        self.hold = False
        self.released = []
        self.closed = False

    def load(self):
        if self.fail_load:
            raise OSError("weights unreadable")

    def step(self, scheduler):
        scheduler.admit()
        if self.hold:
            time.sleep(0.001)
            return
        for t in list(scheduler.running):
            t.completion_tokens += 1
            t.sink.put(TextDelta("x", t.completion_tokens))
            if t.completion_tokens >= self.tokens:
                scheduler.finish(t, "length")

    def release(self, t):
        self.released.append(t)

    def close(self):
        self.closed = True


def test_engine_runs_requests_to_the_end():
    backend = CountingBackend(tokens=3)
    with running_engine(backend, max_batch=2) as engine:
        sinks = [RecordingSink() for _ in range(5)]
        for sink in sinks:
            engine.submit(request([1]), sink)
        for sink in sinks:
            assert sink.wait().reason == "length" and sink.text == "xxx"
        assert len(backend.released) == 5
        assert engine.running_count == 0 and engine.waiting_count == 0
    assert engine.state == "stopped" and backend.closed


def test_queue_bound_counts_waiting_requests_only():
    backend = CountingBackend()
    backend.hold = True
    with running_engine(backend, max_batch=1, max_waiting=2) as engine:
        engine.submit(request([1]), RecordingSink())
        wait_for(lambda: engine.running_count == 1, what="the first request to run")
        engine.submit(request([1]), RecordingSink())
        engine.submit(request([1]), RecordingSink())
        assert engine.waiting_count == 2
        with pytest.raises(QueueFull) as info:
            engine.submit(request([1]), RecordingSink())
        assert info.value.retry_after_s >= 1


def test_shutdown_ends_running_and_waiting_with_a_shutdown_error():
    backend = CountingBackend()
    backend.hold = True
    sinks = [RecordingSink() for _ in range(3)]
    with running_engine(backend, max_batch=1) as engine:
        for sink in sinks:
            engine.submit(request([1]), sink)
        wait_for(lambda: engine.running_count == 1, what="a request to run")
    for sink in sinks:
        assert sink.finished.reason == "shutdown" and isinstance(sink.finished.error, Shutdown)
    with pytest.raises(EngineUnavailable, match="shutting down"):
        engine.submit(request([1]), RecordingSink())


def test_drain_refuses_new_work_but_finishes_queued_work():
    backend = CountingBackend(tokens=2)
    backend.hold = True
    with running_engine(backend, max_batch=1) as engine:
        sinks = [RecordingSink(), RecordingSink()]
        for sink in sinks:
            engine.submit(request([1]), sink)
        engine.begin_drain()
        assert engine.state == "draining" and not engine.ready
        with pytest.raises(EngineUnavailable, match="shutting down"):
            engine.submit(request([1]), RecordingSink())
        backend.hold = False
        for sink in sinks:
            assert sink.wait().reason == "length"


def test_a_failed_load_marks_the_engine_dead():
    backend = CountingBackend(fail_load=True)
    with running_engine(backend) as engine:
        assert engine.state == "dead" and "weights unreadable" in engine.error
        with pytest.raises(EngineUnavailable, match="weights unreadable"):
            engine.submit(request([1]), RecordingSink())
    assert backend.closed


def test_submit_racing_the_engine_end_still_gets_finished():
    """The engine dies between submit's state check and its put: submit finishes the ticket itself."""
    engine = Engine(CountingBackend(), max_batch=1, max_waiting=4)
    engine._phase = "ready"  # as if loaded; no thread runs
    queue = engine._commands

    class DiesOnPut:
        get_nowait = queue.get_nowait

        def put(self, command):
            queue.put(command)
            engine.error = "device lost"
            engine._phase = "dead"

    engine._commands = DiesOnPut()
    sink = RecordingSink()
    engine.submit(request([1]), sink)
    assert sink.finished.reason == "error" and "device lost" in sink.finished.error.message
    assert engine.waiting_count == 0

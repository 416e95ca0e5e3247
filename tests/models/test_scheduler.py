"""The scheduler and the engine loop with a fake backend: no model, only the order of work."""
from __future__ import annotations

import time

import pytest

from models.api import Finished, TextDelta
from models.engine import Engine
from models.errors import EngineUnavailable, ModelError, QueueFull, RequestTimeout, Shutdown
from models.engine_loop import STOP_COMMAND
from models.outputs import Ended, Sampled
from models.scheduler import FINISHED, RUNNING, WAITING, Batch, Scheduler, Ticket
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
    assert scheduler.schedule(free_slots=8).prefill == tuple(tickets[:2])
    assert scheduler.schedule(free_slots=8) == Batch(decode=tuple(tickets[:2]))  # full: decode
    assert [t.state for t in tickets] == [RUNNING, RUNNING, WAITING]
    scheduler.finish(tickets[0], "stop")
    assert scheduler.schedule(free_slots=8) == Batch(prefill=(tickets[2],))


def test_reap_ends_cancelled_and_timed_out_requests_waiting_or_running():
    releases = Releases()
    scheduler = Scheduler(max_batch=2, on_release=releases)
    running_cancelled, running_late, waiting_cancelled, waiting_late, fine = (
        ticket(), ticket(deadline_s=-1), ticket(), ticket(deadline_s=-1), ticket())
    for t in (running_cancelled, running_late):
        scheduler.add(t)
    scheduler.schedule(free_slots=8)
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
    scheduler.schedule(free_slots=8)
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
    scheduler.schedule(free_slots=8)
    with pytest.raises(RuntimeError, match="device lost"):
        scheduler.finish(t, "stop")
    assert t.sink.finished.reason == "stop" and scheduler.running == []


def test_finish_all_ends_running_and_waiting():
    scheduler = Scheduler(max_batch=1)
    a, b = ticket(), ticket()
    scheduler.add(a)
    scheduler.add(b)
    scheduler.schedule(free_slots=8)
    scheduler.finish_all("shutdown")
    for t in (a, b):
        assert t.sink.finished.reason == "shutdown" and isinstance(t.sink.finished.error, Shutdown)
    assert not scheduler.has_work()


# --- the engine loop, with a backend that needs no model ----------------------------------------

class CountingBackend:
    """Each step gives every running request one token ("x"); a request ends after ``tokens`` of them.

    ``hold`` keeps requests running (no output) until the test lets them go."""

    kind, name = "llm", "counting"

    def __init__(self, tokens: int = 3, fail_load: bool = False, slots: int = 8):
        self.tokens = tokens
        self.fail_load = fail_load
        self.slots = slots
        self.hold = False
        self.held: list[Ticket] = []
        self.released = []
        self.closed = False

    def load(self):
        if self.fail_load:
            raise OSError("weights unreadable")

    def free_slots(self):
        return self.slots - len(self.held)

    def execute(self, batch):
        for t in batch.prefill:
            t.work = []
            self.held.append(t)
        if self.hold:
            time.sleep(0.001)
            return []
        return [Sampled(t, 7) for t in batch.decode]

    def release(self, t):
        self.held.remove(t)
        self.released.append(t)

    def close(self):
        self.closed = True


class CountingSequence(list):
    """What ``process`` needs of a request's work: ``append`` -> (text, finish reason), ``output_ids``."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.pending_logprobs = []

    @property
    def output_ids(self):
        return self

    def append(self, token):
        super().append(token)
        return "x", ("length" if len(self) >= self.limit else None)


class CountingSequences(CountingBackend):
    def execute(self, batch):
        outputs = super().execute(batch)
        for t in batch.prefill:
            t.work = CountingSequence(self.tokens)
        return outputs


def test_engine_runs_requests_to_the_end():
    backend = CountingSequences(tokens=3)
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
    backend = CountingSequences(tokens=2)
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
    loop = engine._loop
    loop.phase = "ready"  # as if loaded; no thread runs
    queue = engine._commands

    class DiesOnPut:
        get_nowait = queue.get_nowait
        qsize = queue.qsize

        def put(self, command):
            queue.put(command)
            loop.error = "device lost"
            loop.phase = "dead"

    engine._commands = DiesOnPut()
    sink = RecordingSink()
    engine.submit(request([1]), sink)
    assert sink.finished.reason == "error" and "device lost" in sink.finished.error.message
    assert engine.waiting_count == 0


def test_a_steady_trickle_of_arrivals_cannot_stall_running_requests():
    scheduler = Scheduler(max_batch=8)
    first = ticket()
    scheduler.add(first)
    assert scheduler.schedule(free_slots=8).prefill == (first,)
    kinds = []
    for _ in range(4):  # a new request arrives before every step
        scheduler.add(ticket())
        batch = scheduler.schedule(free_slots=8)
        kinds.append("prefill" if batch.prefill else "decode")
    assert kinds == ["decode", "prefill", "decode", "prefill"]


def test_schedule_admits_no_more_than_the_backend_has_room_for():
    scheduler = Scheduler(max_batch=8)
    tickets = [ticket() for _ in range(3)]
    for t in tickets:
        scheduler.add(t)
    assert scheduler.schedule(free_slots=1).prefill == (tickets[0],)
    assert scheduler.schedule(free_slots=0) == Batch(decode=(tickets[0],))
    assert scheduler.schedule(free_slots=0) == Batch(decode=(tickets[0],))
    assert list(scheduler.waiting) == tickets[1:]


def test_a_ticket_ended_mid_step_leaves_the_batch_once_with_its_first_ending():
    releases = Releases()
    scheduler = Scheduler(max_batch=2, on_release=releases)
    t = ticket()
    scheduler.add(t)
    scheduler.schedule(free_slots=2)
    t.end("cancelled")  # a package's handler ends it while infer runs on
    scheduler.finish(t, "stop")
    assert scheduler.running == [] and releases.released == [t]
    assert t.sink.finished.reason == "cancelled" and t.sink.events.count(t.sink.finished) == 1


def test_an_injected_fault_kills_the_engine_and_ends_every_request_with_an_error():
    backend = CountingSequences(tokens=1000)
    backend.hold = True
    with running_engine(backend, max_batch=2) as engine:
        sinks = [RecordingSink() for _ in range(3)]
        for sink in sinks:
            engine.submit(request([1]), sink)
        wait_for(lambda: engine.running_count == 2, what="two requests to run")
        engine.inject_fault()
        for sink in sinks:
            finished = sink.wait()
            assert finished.reason == "error" and "injected" in finished.error.message
        assert engine.state == "dead" and "InjectedFault" in engine.error
    assert backend.closed


def test_a_stop_command_is_never_taken_for_a_request():
    assert STOP_COMMAND is not None and not isinstance(STOP_COMMAND, Ticket)
    assert Ended(ticket(), "stop").reason == "stop"


def test_a_long_prompt_goes_a_chunk_a_step_beside_decoding_one_at_a_time():
    scheduler = Scheduler(max_batch=4, chunk_tokens=8)
    short, long_a, long_b, after = ticket(), Ticket(request(list(range(1, 20))), RecordingSink()), \
        Ticket(request(list(range(1, 30))), RecordingSink()), ticket()
    scheduler.add(short)
    assert scheduler.schedule(free_slots=4).prefill == (short,)
    for t in (long_a, long_b, after):
        scheduler.add(t)
    assert scheduler.schedule(free_slots=3) == Batch(decode=(short,))  # decode after a prefill step
    # long_a starts chunking; long_b (and, in order, the short one behind it) wait for the chunk lane
    assert scheduler.schedule(free_slots=3) == Batch(decode=(short,), chunk=long_a)
    assert scheduler.schedule(free_slots=2) == Batch(decode=(short,), chunk=long_a)
    assert list(scheduler.waiting) == [long_b, after]
    long_a.completion_tokens = 1  # its prompt is in: it decodes from now on, and the lane is free
    # the lane takes long_b, and the short one behind it is prefilled first, then all three decode
    assert scheduler.schedule(free_slots=2) == Batch(prefill=(after,))
    assert scheduler.schedule(free_slots=0) == Batch(decode=(short, long_a, after), chunk=long_b)

"""Request states and the order of work. No torch here: tested with a fake runner.

A ``Ticket`` is one submitted request, shared by the greenlet that submitted it and the engine thread.
The web side writes only ``cancel_reason`` (an attribute store is atomic); everything else belongs to
the engine thread. The scheduler keeps the waiting queue and the running set, admits work up to
``max_batch``, reaps cancelled and timed-out requests, and sends each request's ``Finished`` event
exactly once.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from models.api import Finished, GenerationRequest, PackageRequest, Sink
from models.errors import RequestTimeout, RivuletError, Shutdown

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Ticket:
    request: GenerationRequest | PackageRequest
    sink: Sink
    cancel_reason: str | None = None  # set by the web side: "cancelled"
    state: str = WAITING
    prompt_tokens: int = 0
    completion_tokens: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    work: Any = None  # the backend's per-request state while running (a Sequence, a package call)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def stop_reason(self, now: float) -> str | None:
        """Why this request must end before the next step, if it must."""
        if self.cancel_reason:
            return self.cancel_reason
        if now >= self.request.deadline:
            return "timeout"
        return None


def error_for(reason: str) -> RivuletError | None:
    if reason == "timeout":
        return RequestTimeout("the request ran past its time limit (RIVULET_REQUEST_TIMEOUT_S)")
    if reason == "shutdown":
        return Shutdown("the server is shutting down; retry the request")
    return None


class Scheduler:
    def __init__(self, max_batch: int, on_release: Callable[[Ticket], None] = lambda t: None) -> None:
        self.max_batch = max_batch
        self.waiting: deque[Ticket] = deque()
        self.running: list[Ticket] = []
        self.on_release = on_release  # frees a running ticket's batch slot / KV cache
        self.left_waiting = 0  # only the engine thread writes it; see Engine.waiting_count

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, ticket: Ticket) -> None:
        self.waiting.append(ticket)

    def admit(self, limit: int | None = None) -> list[Ticket]:
        """Move waiting tickets to running, up to ``max_batch`` running (and ``limit`` new ones, if given)."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch and (limit is None or len(admitted) < limit):
            ticket = self.waiting.popleft()
            self.left_waiting += 1
            ticket.state = RUNNING
            self.running.append(ticket)
            admitted.append(ticket)
        return admitted

    def reap(self, now: float) -> int:
        """Finish every cancelled or timed-out request, waiting or running. -> how many."""
        count = 0
        for ticket in [t for t in (*self.waiting, *self.running) if t.stop_reason(now)]:
            reason = ticket.stop_reason(now)
            self.finish(ticket, reason, error_for(reason))
            count += 1
        return count

    def finish(self, ticket: Ticket, reason: str, error: Exception | None = None) -> None:
        """End ``ticket`` with ``reason``: free its slot and send its ``Finished``, once.

        ``Finished`` goes out even when freeing the slot raises (a broken device): the client hears
        the end of its request, and the exception goes on to fail the engine.
        """
        if ticket.state == FINISHED:
            return
        was_running = ticket.state == RUNNING
        if was_running:
            self.running.remove(ticket)
        else:
            self.waiting.remove(ticket)
            self.left_waiting += 1
        ticket.state = FINISHED
        try:
            if was_running:
                self.on_release(ticket)
        finally:
            ticket.work = None
            ticket.sink.put(Finished(reason, ticket.prompt_tokens, ticket.completion_tokens, error))

    def finish_all(self, reason: str, error: Exception | None = None) -> None:
        for ticket in [*self.running, *self.waiting]:
            self.finish(ticket, reason, error if error is not None else error_for(reason))

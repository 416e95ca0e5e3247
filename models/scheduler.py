"""Request states and the order of work. No torch here: tested with a fake backend.

A ``Ticket`` is one submitted request, shared by the greenlet that submitted it and the engine thread.
The web side writes only ``cancel_reason`` (an attribute store is atomic); everything else belongs to
the engine thread.

The scheduler keeps the waiting queue and the running set. Each step of the engine loop asks it what
to run (``schedule``): newly admitted requests to prefill, or else every running request for one decode
step, beside the next chunk of one long prompt (chunked prefill).

``finish`` is the one way a request ends: it leaves the queue or the batch, its slot is released, and
its ``Finished`` event goes out, exactly once.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from models.api import TIMEOUT, Finished, GenerationRequest, PackageRequest, Sink
from models.errors import error_for

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Ticket:
    request: GenerationRequest | PackageRequest
    sink: Sink
    cancel_reason: str | None = None  # set by the web side: "cancelled" (or "timeout")
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
            return TIMEOUT
        return None

    def end(self, reason: str, error: Exception | None = None) -> bool:
        """Send this request's ``Finished``, once. -> whether this call ended it.

        Only ``Scheduler.finish`` calls it for a request the scheduler holds; the engine client calls
        it for tickets that never reached a scheduler (submitted as the engine ended)."""
        if self.state == FINISHED:
            return False
        self.state = FINISHED
        self.work = None
        self.sink.put(Finished(reason, self.prompt_tokens, self.completion_tokens,
                               error if error is not None else error_for(reason)))
        return True


@dataclass(frozen=True)
class Batch:
    """One step's work: prompts to prefill (just admitted), or rows to decode one token each, and beside
    them the next chunk of one long prompt."""

    prefill: tuple[Ticket, ...] = ()
    decode: tuple[Ticket, ...] = ()
    chunk: Ticket | None = None

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode or self.chunk is not None)


class Scheduler:
    def __init__(self, max_batch: int, on_release: Callable[[Ticket], None] = lambda t: None,
                 chunk_tokens: int | None = None) -> None:
        self.max_batch = max_batch
        self.waiting: deque[Ticket] = deque()
        self.running: list[Ticket] = []
        self.on_release = on_release  # frees a running ticket's batch slot / KV cache
        self._prefilled_last = False  # prefill and decode steps alternate while both have work
        # Prompts longer than this are prefilled ``chunk_tokens`` at a time, one chunk per step beside the
        # running rows' decoding, one such prompt at a time (None: never).
        self.chunk_tokens = chunk_tokens
        self.chunking: Ticket | None = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, ticket: Ticket) -> None:
        self.waiting.append(ticket)

    def schedule(self, free_slots: int) -> Batch:
        """What the next step runs. ``free_slots``: how many more requests the backend can hold now
        (free KV-cache rows; 1 or 0 for a package). New requests are prefilled first, so that a
        request's time to first token does not wait behind other requests' decoding; but never twice
        in a row while requests are running, so a steady trickle of arrivals cannot stall them. A long
        prompt goes one chunk per step, beside the decoding rows, until its first token."""
        chunking = self.chunking
        if chunking is not None and (chunking.state == FINISHED or chunking.completion_tokens):
            self.chunking = chunking = None  # its prompt is in (it decodes now), or it ended
        decoding = tuple(t for t in self.running if t is not chunking)
        if not (self._prefilled_last and (decoding or chunking)):
            admitted = self._admit(free_slots)
            short = tuple(t for t in admitted if t is not self.chunking)
            if short:
                self._prefilled_last = True
                return Batch(prefill=short)
        self._prefilled_last = False
        return Batch(decode=decoding, chunk=self.chunking)

    def _admit(self, limit: int) -> list[Ticket]:
        """Admit in order; a long prompt becomes the one being chunked, and one already in progress
        holds the next long one (and those behind it) in the queue."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch and len(admitted) < limit:
            ticket = self.waiting[0]
            if self._is_long(ticket):
                if self.chunking is not None:
                    break
                self.chunking = ticket
            self.waiting.popleft()
            ticket.state = RUNNING
            self.running.append(ticket)
            admitted.append(ticket)
        return admitted

    def _is_long(self, ticket: Ticket) -> bool:
        prompt = getattr(ticket.request, "prompt_ids", ())
        return self.chunk_tokens is not None and len(prompt) > self.chunk_tokens

    def reap(self, now: float) -> int:
        """Finish every cancelled or timed-out request, waiting or running. -> how many."""
        count = 0
        for ticket in [t for t in (*self.waiting, *self.running) if t.stop_reason(now)]:
            self.finish(ticket, ticket.stop_reason(now))
            count += 1
        return count

    def finish(self, ticket: Ticket, reason: str, error: Exception | None = None) -> None:
        """End ``ticket`` with ``reason``: take it off the queue or the batch, free its slot, and send its
        ``Finished`` (once: a ticket a package ended mid-``infer`` keeps its first ending).

        ``Finished`` goes out even when freeing the slot raises (a broken device): the client hears
        the end of its request, and the exception goes on to fail the engine.
        """
        if ticket in self.running:  # identity (eq=False); the batch is small
            self.running.remove(ticket)
            try:
                self.on_release(ticket)
            finally:
                ticket.end(reason, error)
        elif ticket.state == WAITING:
            self.waiting.remove(ticket)
            ticket.end(reason, error)

    def finish_all(self, reason: str, error: Exception | None = None) -> None:
        for ticket in [*self.running, *self.waiting]:
            self.finish(ticket, reason, error)


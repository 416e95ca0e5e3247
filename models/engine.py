"""The engine client: what greenlets call (submit, abort, state), beside the thread that does the work.

``Engine`` is the web side's handle on one engine thread (``models/engine_loop.py``). It never touches
tensors or the scheduler's lists; it puts tickets on the thread's command queue and reads a few
single-writer fields (no lock, which would block the gevent hub). Who starts the thread is the
caller's business: ``Engine.run`` is its body, and under gevent it must run on a real OS thread
(service/lifecycle.py); nothing here imports gevent.
"""
from __future__ import annotations

import _queue
import time

from models.api import ERROR, SHUTDOWN, GenerationRequest, PackageRequest, Sink
from models.cpus import usable_cpus
from models.engine_loop import DEAD, DRAINING, READY, STARTING, STOP_COMMAND, STOPPED, Backend, EngineLoop
from models.errors import EngineUnavailable, ModelError, QueueFull
from models.scheduler import Scheduler, Ticket

__all__ = ["Engine", "STARTING", "READY", "DRAINING", "DEAD", "STOPPED"]


class Engine:
    def __init__(self, backend: Backend, *, max_batch: int, max_waiting: int,
                 torch_threads: int | None = None) -> None:
        self.backend = backend
        self.max_waiting = max_waiting
        self._commands: _queue.SimpleQueue = _queue.SimpleQueue()
        self._scheduler = Scheduler(max_batch, on_release=backend.release,
                                    chunk_tokens=getattr(backend, "prefill_chunk_tokens", None))
        # Leave a core to the gevent hub: it must keep reading sockets while torch computes. Counted from
        # the CPUs this process may use (a container's quota), not the host's.
        self._loop = EngineLoop(backend, self._scheduler, self._commands,
                                torch_threads or max(1, usable_cpus() - 1))
        self._draining = False  # written by the web side: begin_drain()
        self._declared_dead: str | None = None  # written by the web side: declare_dead()

    # --- state --------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """starting, ready, draining, dead or stopped."""
        phase = self._loop.phase
        if self._declared_dead is not None and phase != STOPPED:
            return DEAD
        if self._draining and phase in (STARTING, READY):
            return DRAINING
        return phase

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def was_ready(self) -> bool:
        """The model loaded and served: a failure now is a fault (restart), not a model that cannot load."""
        return self._loop.was_ready

    @property
    def error(self) -> str | None:
        return self._declared_dead or self._loop.error

    @property
    def torch_threads(self) -> int:
        return self._loop.torch_threads

    @property
    def waiting_count(self) -> int:
        """Requests submitted but not running yet: on the command queue or in the scheduler's queue.
        Each length is read atomically; a ticket in flight between the two may be missed for a moment."""
        return self._commands.qsize() + len(self._scheduler.waiting)

    @property
    def running_count(self) -> int:
        return len(self._scheduler.running)

    def step_running_s(self, now: float | None = None) -> float:
        """How long the engine has been inside its current step (0 between steps). A step is one batched
        forward pass, or a whole ``infer`` of a model package."""
        started = self._loop.step_started_at
        return 0.0 if started is None else (now or time.monotonic()) - started

    # --- requests -----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest | PackageRequest, sink: Sink) -> Ticket:
        """Queue ``request``; its events go to ``sink``. Raises EngineUnavailable or QueueFull."""
        if self.state != READY:
            raise EngineUnavailable(self._unavailable_reason())
        if self.waiting_count >= self.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry shortly")
        ticket = Ticket(request, sink)
        self._commands.put(ticket)
        if self._loop.phase in (DEAD, STOPPED):
            # The engine ended between the check above and the put: its last drain of the queue may have
            # missed this ticket. Whatever is still queued never reached a scheduler: end it here.
            self._end_unclaimed()
        return ticket

    def abort(self, ticket: Ticket, reason: str = "cancelled") -> None:
        """Ask the engine to drop ``ticket`` before its next step. Safe to call twice or after the end."""
        if ticket.cancel_reason is None:
            ticket.cancel_reason = reason

    # --- lifecycle ----------------------------------------------------------------------------

    def run(self) -> None:
        """The engine thread's body: returns after shutdown or an engine-wide failure."""
        self._loop.run()

    def begin_drain(self) -> None:
        """Stop admitting new requests; queued and running ones go on (graceful shutdown, first half)."""
        self._draining = True

    def shutdown(self) -> None:
        """End every open request with a shutdown error and stop the thread (second half)."""
        self._commands.put(STOP_COMMAND)

    def declare_dead(self, reason: str) -> None:
        """The web side gave up on a stuck engine thread (a step that never ends): refuse new work.
        The stuck thread cannot be stopped from outside; the worker restarts instead."""
        self._declared_dead = reason

    def inject_fault(self) -> None:
        """Make the next step fail as a broken device would (tests only, behind RIVULET_TEST_HOOKS)."""
        self._loop.fault_requested = True

    def _end_unclaimed(self) -> None:
        reason = SHUTDOWN if self._loop.phase == STOPPED else ERROR
        error = None if reason == SHUTDOWN else ModelError(f"the engine failed: {self.error}")
        while True:
            try:
                command = self._commands.get_nowait()
            except _queue.Empty:
                return
            if isinstance(command, Ticket):
                command.end(reason, error)

    def _unavailable_reason(self) -> str:
        return {
            STARTING: "the model is still loading",
            DRAINING: "the server is shutting down",
            STOPPED: "the server is shutting down",
            DEAD: f"the engine failed: {self.error}",
        }.get(self.state, "the engine is not ready")

"""The engine: one real OS thread that owns the model and runs every request through shared steps.

The web side calls ``submit`` / ``abort`` from greenlets and reads events from the sink it passed in;
it never touches tensors. This thread never touches sockets. Commands cross over a C
``_queue.SimpleQueue`` (gevent does not patch it, so the thread blocks for real and greenlets never
block on it). Who starts the thread is the caller's business: under gevent it must be a real OS
thread (see service/lifecycle.py); nothing here imports gevent.
"""
from __future__ import annotations

import _queue
import logging
import time
from typing import Protocol

import torch

from models.api import Finished, GenerationRequest, PackageRequest, Sink
from models.cpus import usable_cpus
from models.errors import EngineUnavailable, ModelError, QueueFull
from models.scheduler import FINISHED, Scheduler, Ticket, error_for

log = logging.getLogger("rivulet.engine")

STARTING, READY, DRAINING, DEAD, STOPPED = "starting", "ready", "draining", "dead", "stopped"
_WAKE, _SHUTDOWN = object(), object()
IDLE_POLL_S = 1.0  # how long an idle engine sleeps between looks at the command queue


class Backend(Protocol):
    """What the engine thread drives: a Llama checkpoint (batched) or a model package."""

    kind: str  # "llm" or "package"
    name: str

    def load(self) -> None: ...
    def step(self, scheduler: Scheduler) -> None: ...
    def release(self, ticket: Ticket) -> None: ...
    def close(self) -> None: ...


class Engine:
    def __init__(self, backend: Backend, *, max_batch: int, max_waiting: int,
                 torch_threads: int | None = None) -> None:
        self.backend = backend
        self.max_waiting = max_waiting
        self.scheduler = Scheduler(max_batch, on_release=backend.release)
        # Leave a core to the gevent hub: it must keep reading sockets while torch computes. Counted from
        # the CPUs this process may use (a container's quota), not the host's.
        self.torch_threads = torch_threads or max(1, usable_cpus() - 1)
        # Each field has one writer, so no lock is needed (a lock would block the gevent hub):
        self._phase = STARTING  # the engine thread: starting, ready, dead, stopped
        self._draining = False  # the web side: begin_drain()
        self.error: str | None = None  # the engine thread, before it marks itself dead
        self._commands: _queue.SimpleQueue = _queue.SimpleQueue()
        self._submitted = 0  # the submitting (hub) thread

    # --- the web side's API (called from greenlets) -------------------------------------------

    @property
    def state(self) -> str:
        """starting, ready, draining, dead or stopped."""
        phase = self._phase
        if self._draining and phase in (STARTING, READY):
            return DRAINING
        return phase

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def waiting_count(self) -> int:
        """Requests submitted but not yet running. Each counter has a single writer: no lock needed."""
        return self._submitted - self.scheduler.left_waiting

    @property
    def running_count(self) -> int:
        return len(self.scheduler.running)

    def submit(self, request: GenerationRequest | PackageRequest, sink: Sink) -> Ticket:
        if self.state != READY:
            raise EngineUnavailable(self._unavailable_reason())
        if self.waiting_count >= self.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry shortly")
        ticket = Ticket(request, sink)
        self._submitted += 1
        self._commands.put(ticket)
        if self._phase in (DEAD, STOPPED):
            # The engine ended between the check above and the put: its last drain of the queue may
            # have missed this ticket, so nobody else will ever finish it.
            self._finish_leftovers()
        return ticket

    def abort(self, ticket: Ticket, reason: str = "cancelled") -> None:
        """Ask the engine to drop ``ticket`` before its next step. Safe to call twice or after the end."""
        if ticket.state != FINISHED and ticket.cancel_reason is None:
            ticket.cancel_reason = reason
            self._commands.put(_WAKE)

    def begin_drain(self) -> None:
        """Stop admitting new requests; queued and running ones go on (graceful shutdown, first half)."""
        self._draining = True

    def shutdown(self) -> None:
        """End every open request with a shutdown error and stop the thread (second half)."""
        self._commands.put(_SHUTDOWN)

    def _unavailable_reason(self) -> str:
        return {
            STARTING: "the model is still loading",
            DRAINING: "the server is shutting down",
            STOPPED: "the server is shutting down",
            DEAD: f"the engine failed: {self.error}",
        }.get(self.state, "the engine is not ready")

    # --- the engine thread ---------------------------------------------------------------------

    def run(self) -> None:
        """The thread's body: load, then loop until shutdown or an engine-wide failure."""
        torch.set_num_threads(self.torch_threads)
        try:
            with torch.inference_mode():
                self.backend.load()
        except Exception as exc:  # start-up failure: report it on /ready and in the log
            log.exception("loading %s failed", self.backend.name)
            self._die(f"loading failed: {exc}")
            self._close_backend()
            return
        self._phase = READY
        log.info("engine ready: %s (%s)", self.backend.name, self.backend.kind)
        try:
            with torch.inference_mode():
                self._loop()
        except Exception as exc:  # one request's failure never reaches here; this one is engine-wide
            log.exception("engine failed")
            self._die(f"{type(exc).__name__}: {exc}")
        finally:
            self._close_backend()

    def _close_backend(self) -> None:
        try:
            self.backend.close()
        except Exception:  # the engine is over either way; keep the first error, log this one
            log.exception("closing %s failed", self.backend.name)

    def _loop(self) -> None:
        while True:
            if self._take_commands():
                self._stop()
                return
            self.scheduler.reap(time.monotonic())
            if self.scheduler.has_work():
                self.backend.step(self.scheduler)

    def _take_commands(self) -> bool:
        """Move submitted tickets into the scheduler. Blocks while idle. -> shutdown was asked."""
        block = not self.scheduler.has_work()
        shutdown = False
        while True:
            try:
                command = self._commands.get(timeout=IDLE_POLL_S) if block else self._commands.get_nowait()
            except _queue.Empty:
                return shutdown
            block = False
            if command is _SHUTDOWN:
                shutdown = True
            elif isinstance(command, Ticket):
                self.scheduler.add(command)

    def _stop(self) -> None:
        self._end(STOPPED, "shutdown", None)

    def _die(self, message: str) -> None:
        self.error = message
        self._end(DEAD, "error", ModelError(f"the engine failed: {message}"))

    def _end(self, phase: str, reason: str, error: Exception | None) -> None:
        """Mark the engine ended, then finish every open request, queued ones included.

        The phase is set first: a ``submit`` racing with this drain sees it after its put and
        finishes what is left in the queue itself (``_finish_leftovers``).
        """
        self._phase = phase
        # The cache is about to be dropped (and may be what failed): do not compact it.
        self.scheduler.on_release = lambda ticket: None
        while True:
            try:
                command = self._commands.get_nowait()
            except _queue.Empty:
                break
            if isinstance(command, Ticket):
                self.scheduler.add(command)
        self.scheduler.finish_all(reason, error)

    def _finish_leftovers(self) -> None:
        """Runs on the submitting thread once the engine has ended: finish tickets still queued."""
        reason = "shutdown" if self._phase == STOPPED else "error"
        error = error_for(reason) or ModelError(f"the engine failed: {self.error}")
        while True:
            try:
                command = self._commands.get_nowait()
            except _queue.Empty:
                return
            if isinstance(command, Ticket) and command.state != FINISHED:
                command.state = FINISHED
                self._submitted -= 1  # it never reached the scheduler's count
                command.sink.put(Finished(reason, error=error))

"""The engine thread's body: load the model, then schedule → execute → process until told to stop.

One real OS thread runs this (see service/lifecycle.py for why it must be a real one under gevent).
It owns the scheduler and the backend; nothing else touches them while it runs. Requests arrive over
a C ``_queue.SimpleQueue`` (gevent does not patch it, so this thread blocks on it for real while idle
and greenlets never block on it).

A failure is either one request's (the backend returns it as a ``Failed`` output, or processing a
token raises for that request) or the engine's: anything a step raises. An engine failure ends every
open request with an error and marks the engine dead; the web side then restarts the worker.
"""
from __future__ import annotations

import _queue
import logging
import time
from typing import Protocol

import torch

from models.api import ERROR, SHUTDOWN
from models.errors import ModelError
from models.outputs import Output, process
from models.scheduler import Batch, Scheduler, Ticket

log = logging.getLogger("rivulet.engine")

STARTING, READY, DRAINING, DEAD, STOPPED = "starting", "ready", "draining", "dead", "stopped"
STOP_COMMAND = object()  # put on the command queue by Engine.shutdown()


class Backend(Protocol):
    """What the engine thread drives: a Llama checkpoint (batched) or a model package (one at a time)."""

    kind: str  # "llm" or "package"
    name: str

    def load(self) -> None: ...
    def free_slots(self) -> int: ...
    def execute(self, batch: Batch) -> list[Output]: ...
    def release(self, ticket: Ticket) -> None: ...
    def close(self) -> None: ...


class InjectedFault(RuntimeError):
    """Raised by the next step when a test asked for it (``Engine.inject_fault``, RIVULET_TEST_HOOKS)."""


class EngineLoop:
    def __init__(self, backend: Backend, scheduler: Scheduler, commands: _queue.SimpleQueue,
                 torch_threads: int) -> None:
        self.backend = backend
        self.scheduler = scheduler
        self.commands = commands
        self.torch_threads = torch_threads
        # Written by this thread only; the engine client reads them.
        self.phase = STARTING
        self.error: str | None = None
        self.step_started_at: float | None = None  # monotonic start of the step in progress
        self.fault_requested = False  # written by the client (a test hook), cleared here
        self.was_ready = False  # it loaded: a failure now is a fault to recover from, not a bad model

    def run(self) -> None:
        """Load, then loop until shutdown or an engine-wide failure; the backend is closed either way."""
        torch.set_num_threads(self.torch_threads)
        try:
            try:
                with torch.inference_mode():
                    self.backend.load()
            except Exception as exc:  # start-up failure: reported on /ready and in the log
                log.exception("loading %s failed", self.backend.name)
                self._end(DEAD, f"loading failed: {exc}")
                return
            self.phase = READY
            self.was_ready = True
            log.info("engine ready: %s (%s)", self.backend.name, self.backend.kind)
            try:
                with torch.inference_mode():
                    self._loop()
            except Exception as exc:  # a request's own failure never reaches here: this one is engine-wide
                log.exception("engine failed")
                self._end(DEAD, f"{type(exc).__name__}: {exc}")
                return
            self._end(STOPPED)
        finally:
            self._close_backend()

    def _loop(self) -> None:
        while not self._take_commands(block=not self.scheduler.has_work()):
            self.scheduler.reap(time.monotonic())
            batch = self.scheduler.schedule(self.backend.free_slots())
            if not batch:
                continue
            self.step_started_at = time.monotonic()
            if self.fault_requested:
                self.fault_requested = False
                raise InjectedFault("a fault injected by a test hook")
            outputs = self.backend.execute(batch)
            self.step_started_at = None
            process(self.scheduler, outputs)

    def _take_commands(self, *, block: bool) -> bool:
        """Move submitted tickets into the scheduler (waiting for one while idle). -> stop was asked."""
        stop = False
        while True:
            try:
                command = self.commands.get() if block else self.commands.get_nowait()
            except _queue.Empty:
                return stop
            block = False
            if command is STOP_COMMAND:
                stop = True
            else:
                self.scheduler.add(command)

    def _end(self, phase: str, error: str | None = None) -> None:
        """Mark the engine ended, then finish every open request, queued ones included.

        The phase is set first: a ticket submitted after this drain is finished by the submitter
        (``Engine.submit``), which sees the phase after its put."""
        self.error = error
        self.phase = phase
        self.step_started_at = None
        # The cache is about to be dropped (and may be what failed): do not compact it.
        self.scheduler.on_release = lambda ticket: None
        self._take_commands(block=False)
        if phase == DEAD:
            self.scheduler.finish_all(ERROR, ModelError(f"the engine failed: {error}"))
        else:
            self.scheduler.finish_all(SHUTDOWN)

    def _close_backend(self) -> None:
        try:
            self.backend.close()
        except Exception:  # the engine is over either way; keep the first error, log this one
            log.exception("closing %s failed", self.backend.name)

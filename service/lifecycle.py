"""One worker's runtime: the served model, its engine thread, the channel bridge, drain and recovery.

``create_app`` builds a ``Runtime`` (cheap: config and tokenizer only, no weights, no thread). The
engine thread starts later, from gunicorn's ``post_worker_init`` in the forked worker, through
``on_worker_start``: after fork, because CUDA and threads do not survive a fork; returning at once,
because ``/ready`` answers 503 until the model is loaded and the worker must serve meanwhile.

Then one greenlet watches the worker (``watch_worker``): on SIGTERM it drains (stop admitting, let
running work finish, end the rest with a shutdown event); when the engine fails after it was ready, or
one step runs far past any request's time limit (a stuck device, a package's ``infer`` that never
returns), it ends the worker so that gunicorn starts a fresh one, which reloads the model.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.monkey

from models.serving import DEAD, Backend, ModelSpec, ServedModel, open_model
from service.channel import Bridge
from service.devices import worker_device
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("rivulet.service")

# engine.shutdown() is called this long before gunicorn's graceful_timeout ends, so every stream still
# open gets its shutdown event and [DONE] before gunicorn would cut the connections.
SHUTDOWN_MARGIN_S = 2.0
WATCH_POLL_S = 0.1  # how often the watcher looks at the worker and the engine
# Once the engine has failed, the open streams get this long to write their error events before the
# worker stops (they end at once; this is only the time to flush them to the sockets).
FAILED_FLUSH_S = 1.0


@dataclass(eq=False)
class Runtime:
    """Everything a worker's routes share. Stored in ``app.extensions["rivulet"]``."""

    settings: Settings
    model: ServedModel
    metrics: Metrics
    bridge: Bridge | None = None
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models' "created"
    _thread_done: bool = field(default=False, repr=False)  # written once by the engine thread

    @classmethod
    def build(cls, settings: Settings, *, backend: Backend | None = None) -> Runtime:
        # One worker per GPU: this worker's own device (RIVULET_DEVICE=cuda -> cuda:<its slot>).
        spec = ModelSpec(settings.model, worker_device(settings.device), settings.max_batch, settings.max_waiting,
                         settings.max_context, settings.prefill_chunk_tokens, settings.compile,
                         settings.prefix_caching, settings.packed_weights, settings.cuda_graphs,
                         settings.native_kernels, settings.quant)
        model = open_model(spec, backend=backend)
        engine = model.engine
        metrics = Metrics(running=lambda: engine.running_count, waiting=lambda: engine.waiting_count,
                          drained=lambda: model.drained_requests,
                          prefix_cached=lambda: model.prefix_cached_tokens)
        return cls(settings, model, metrics)

    @property
    def engine(self) -> Any:
        return self.model.engine

    @property
    def model_name(self) -> str:
        return self.model.name

    def start(self) -> None:
        """Create the bridge on this thread's hub and start the engine's OS thread. Returns at once."""
        if self.bridge is not None:
            return
        self.bridge = Bridge(gevent.get_hub())
        # A patched threading.Thread (and even get_original("threading", "Thread")) would run the engine
        # as a greenlet on the hub, freezing every connection while torch computes.
        start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
        start_new_thread(self._engine_thread, ())
        log.info("engine thread started for %s on %s", self.model.name, self.model.device)

    def _engine_thread(self) -> None:
        try:
            self.engine.run()  # returns after shutdown or an engine-wide failure, backend closed
        finally:
            self._thread_done = True

    def stop(self, wait_s: float = 10.0) -> bool:
        """End every request with a shutdown error and wait (bounded) for the engine thread to finish,
        so that the backend is closed (a package's ``finalize()`` runs) before the process exits.
        -> whether it finished."""
        if self.bridge is None:
            return True
        self.engine.shutdown()
        for _ in range(int(wait_s / WATCH_POLL_S)):
            if self._thread_done:
                return True
            gevent.sleep(WATCH_POLL_S)
        log.warning("the engine thread did not stop within %.0fs", wait_s)
        return False


def shutdown_delay(graceful_timeout: float) -> float:
    """Seconds after SIGTERM at which open streams are ended: as late as the grace time safely allows."""
    if graceful_timeout <= 2 * SHUTDOWN_MARGIN_S:
        return graceful_timeout / 2
    return graceful_timeout - SHUTDOWN_MARGIN_S


def stuck_after_s(settings: Settings) -> float:
    """A step running longer than this is stuck: no request may run that long (its time limit) and the
    engine checks deadlines between steps, so even a slow step ends well within it."""
    return settings.step_timeout_s or 2 * settings.request_timeout_s + 10.0


def engine_failure(runtime: Runtime, now: float) -> str | None:
    """Why this worker must be replaced, if it must: its engine died after it was ready, or is stuck."""
    engine = runtime.engine
    if engine.state == DEAD and engine.was_ready:
        return f"the engine failed: {engine.error}"
    running_s = engine.step_running_s(now)
    if running_s > stuck_after_s(runtime.settings):
        return (f"the engine has been inside one step for {running_s:.0f}s (a stuck device, or a model "
                f"package's infer that does not return; RIVULET_STEP_TIMEOUT_S)")
    return None


def watch_worker(runtime: Runtime, worker: Any) -> gevent.Greenlet:
    """SIGTERM makes gunicorn set ``worker.alive = False``, stop accepting and wait ``graceful_timeout``
    for open connections. Then: stop admitting work (new requests get 503), let running generations go
    on, and shortly before the grace time ends end the rest with a shutdown event and [DONE], so no
    stream is ever cut mid-chunk.

    An engine that fails or gets stuck makes this worker useless (every request would fail, or wait
    forever): its streams end with an error event, /ready says 503, and the worker exits the same
    graceful way, so gunicorn starts a fresh one that reloads the model."""

    def watch() -> None:
        while worker.alive:
            failure = engine_failure(runtime, time.monotonic())
            if failure is not None:
                log.error("worker %s is replaced: %s", worker.pid, failure)
                runtime.engine.declare_dead(failure)  # refuse new work; stuck streams end at their deadlines
                gevent.sleep(FAILED_FLUSH_S)
                worker.alive = False
                return
            gevent.sleep(WATCH_POLL_S)
        delay = shutdown_delay(float(worker.cfg.graceful_timeout))
        log.info("worker %s draining: open streams have %.1fs to finish", worker.pid, delay)
        runtime.engine.begin_drain()
        gevent.sleep(delay)
        log.info("worker %s: ending the streams still open", worker.pid)
        runtime.engine.shutdown()

    return gevent.spawn(watch)


def on_worker_start(worker: Any) -> None:
    """gunicorn ``post_worker_init``: route our logs through gunicorn's, start the engine, watch the worker."""
    rivulet_log = logging.getLogger("rivulet")
    error_log = worker.log.error_log
    rivulet_log.handlers = list(error_log.handlers)
    rivulet_log.setLevel(error_log.getEffectiveLevel())  # gunicorn's --log-level applies to ours too
    rivulet_log.propagate = False
    runtime: Runtime = worker.wsgi.extensions["rivulet"]
    runtime.start()
    watch_worker(runtime, worker)


def on_worker_exit(worker: Any) -> None:
    """gunicorn ``worker_exit``: make sure the engine thread ends and a package's ``finalize()`` runs."""
    runtime: Runtime | None = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("rivulet")
    if runtime is not None and not runtime.stop():
        # A stuck engine thread (a device that hangs, a package's infer that never returns) can hold the
        # interpreter's exit forever, and with it this process, even after its master is gone: leave now.
        # Nothing is lost: every stream has ended, and this worker holds no state on disk.
        log.error("worker %s exits with its engine thread still running", worker.pid)
        os._exit(1)

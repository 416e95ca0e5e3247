"""One worker's runtime: the backend, the engine and its OS thread, the channel bridge, graceful drain.

``create_app`` builds a ``Runtime`` (cheap: config and tokenizer only, no weights, no thread). The
engine thread starts later, from gunicorn's ``post_worker_init`` in the forked worker, through
``on_worker_start``: after fork, because CUDA and threads do not survive a fork; returning at once,
because ``/ready`` answers 503 until the model is loaded and the worker must serve meanwhile.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.monkey
import torch

from models.engine import Backend, Engine
from models.llm_backend import LlamaBackend
from models.package import PackageBackend, is_package_dir
from service.channel import Bridge
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("rivulet.service")

# engine.shutdown() is called this long before gunicorn's graceful_timeout ends, so every stream still
# open gets its shutdown event and [DONE] before gunicorn would cut the connections.
SHUTDOWN_MARGIN_S = 2.0
DRAIN_POLL_S = 0.1  # how often the drain watcher looks at worker.alive


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_backend(settings: Settings) -> Backend:
    """A model package when RIVULET_MODEL is one, else a Llama checkpoint. Raises CheckpointError."""
    device = resolve_device(settings.device)
    if is_package_dir(settings.model):
        return PackageBackend(settings.model, device)
    return LlamaBackend(settings.model, device, settings.max_batch, settings.max_context)


@dataclass(eq=False)
class Runtime:
    """Everything a worker's routes share. Stored in ``app.extensions["rivulet"]``."""

    settings: Settings
    backend: Backend
    engine: Engine
    metrics: Metrics
    bridge: Bridge | None = None
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models' "created"
    _started: bool = field(default=False, repr=False)
    _thread_done: bool = field(default=False, repr=False)  # written once by the engine thread

    @classmethod
    def build(cls, settings: Settings, *, backend: Backend | None = None) -> Runtime:
        backend = backend or build_backend(settings)
        engine = Engine(backend, max_batch=settings.max_batch, max_waiting=settings.max_waiting)
        metrics = Metrics(running=lambda: engine.running_count, waiting=lambda: engine.waiting_count)
        return cls(settings, backend, engine, metrics)

    @property
    def model_name(self) -> str:
        return self.backend.name

    @functools.cached_property
    def prompt_char_limit(self) -> int:
        """No prompt longer than this many characters can fit an LLM's context: a token covers at most
        the longest vocabulary piece. Checked before tokenizing, so a huge prompt is refused at once
        instead of holding the hub (and every stream on it) while sentencepiece works through it."""
        sp = self.backend.tokenizer.sp
        longest_piece = max(len(sp.id_to_piece(i)) for i in range(sp.get_piece_size()))
        return self.backend.context_length * max(1, longest_piece)

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Create the bridge on this thread's hub and start the engine's OS thread. Returns at once."""
        if self._started:
            return
        self._started = True
        self.bridge = Bridge(gevent.get_hub())
        # A patched threading.Thread (and even get_original("threading", "Thread")) would run the engine
        # as a greenlet on the hub, freezing every connection while torch computes.
        start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
        start_new_thread(self._engine_thread, ())
        log.info("engine thread started for %s on %s", self.backend.name, getattr(self.backend, "device", "?"))

    def _engine_thread(self) -> None:
        try:
            self.engine.run()  # returns after shutdown or an engine-wide failure, backend closed
        finally:
            self._thread_done = True

    def stop(self, wait_s: float = 10.0) -> None:
        """End every request with a shutdown error and wait (bounded) for the engine thread to finish,
        so that the backend is closed (a package's ``finalize()`` runs) before the process exits."""
        if not self._started:
            return
        self.engine.shutdown()
        for _ in range(int(wait_s / DRAIN_POLL_S)):
            if self._thread_done:
                return
            gevent.sleep(DRAIN_POLL_S)
        log.warning("the engine thread did not stop within %.0fs", wait_s)


def shutdown_delay(graceful_timeout: float) -> float:
    """Seconds after SIGTERM at which open streams are ended: as late as the grace time safely allows."""
    if graceful_timeout <= 2 * SHUTDOWN_MARGIN_S:
        return graceful_timeout / 2
    return graceful_timeout - SHUTDOWN_MARGIN_S


def watch_for_drain(runtime: Runtime, worker: Any) -> gevent.Greenlet:
    """SIGTERM makes gunicorn set ``worker.alive = False``, stop accepting and wait ``graceful_timeout``
    for open connections. Then: stop admitting work (new requests get 503), let running generations go
    on, and shortly before the grace time ends end the rest with a shutdown event and [DONE], so no
    stream is ever cut mid-chunk."""

    def watch() -> None:
        while worker.alive:
            gevent.sleep(DRAIN_POLL_S)
        delay = shutdown_delay(float(worker.cfg.graceful_timeout))
        log.info("worker %s draining: open streams have %.1fs to finish", worker.pid, delay)
        runtime.engine.begin_drain()
        gevent.sleep(delay)
        log.info("worker %s: ending the streams still open", worker.pid)
        runtime.engine.shutdown()

    return gevent.spawn(watch)


def on_worker_start(worker: Any) -> None:
    """gunicorn ``post_worker_init``: route our logs through gunicorn's, start the engine, watch for drain."""
    rivulet_log = logging.getLogger("rivulet")
    error_log = worker.log.error_log
    rivulet_log.handlers = list(error_log.handlers)
    rivulet_log.setLevel(error_log.getEffectiveLevel())  # gunicorn's --log-level applies to ours too
    rivulet_log.propagate = False
    runtime: Runtime = worker.wsgi.extensions["rivulet"]
    runtime.start()
    watch_for_drain(runtime, worker)


def on_worker_exit(worker: Any) -> None:
    """gunicorn ``worker_exit``: make sure the engine thread ends and a package's ``finalize()`` runs."""
    runtime: Runtime | None = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("rivulet")
    if runtime is not None:
        runtime.stop()

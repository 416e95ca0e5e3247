"""Prometheus metrics: one registry per app in one process, or every worker's through one port.

Names are a contract (ARCHITECTURE.md): dashboards and the autoscaler read them.
``rivulet_requests_running`` / ``_waiting`` are read from the engine; the rest are counted by the request
pipeline (service/jobs.py) and the request log.

Two modes, chosen by prometheus_client itself when it is imported (``PROMETHEUS_MULTIPROC_DIR``):

- single process (the variable unset: tests, an embedded app): each ``Metrics`` has its own registry, so
  a test can build several apps in one process; the engine gauges are read at scrape time.
- multiprocess (gunicorn.conf.py's master sets the variable up before it forks, see
  service/metrics_dir.py): every worker writes its values to files in that directory and ``/metrics``,
  whichever worker answers it, merges all of them, so one port reports every worker. Counters and
  histograms are summed, including those of workers that have died (totals never go back). Gauges are
  ``livesum``: the sum over the live workers only (gunicorn.conf.py's ``child_exit`` drops a dead
  worker's), which is what "requests running/waiting/open streams on this replica" means.
"""
from __future__ import annotations

import contextlib
import logging
import os
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics_dir import MULTIPROC_DIR_ENV

log = logging.getLogger("rivulet.service")

# How often a worker in multiprocess mode writes its engine gauges (running, waiting) to its file: the
# worker answering a scrape writes its own first, the others' are at most this old.
ENGINE_GAUGES_REFRESH_S = 1.0

# Latency buckets from a fast GPU step (~5 ms) to a long CPU prefill or a deep queue.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, writing each bucket once.

    A stream's inter-token gaps are observed in batches (service/jobs.py): one observe per token wrote the
    sum and a bucket through prometheus_client's locked value objects (in multiprocess mode, its mmap
    files) every time: with the token counter's write, a fifth of the hub's work per streamed token
    (bench/README.md section 13). This writes what those observes
    would: the sum once, and each bucket once with its count (tests/service/test_metrics.py compares
    the two). Where prometheus_client's internals differ, it observes one at a time."""
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum
    except AttributeError:
        for value in values:
            histogram.observe(value)
        return
    if not values:
        return
    total.inc(sum(values))
    # observe() counts a value in the first bucket whose upper bound is >= it (the last one is +Inf).
    for index, count in Tally(bisect_left(bounds, value) for value in values).items():
        buckets[index].inc(count)


def multiprocess_mode() -> bool:
    """True when prometheus_client keeps values in PROMETHEUS_MULTIPROC_DIR (decided at its import)."""
    return bool(os.environ.get(MULTIPROC_DIR_ENV))


class EngineCount:
    """A counter the engine keeps as a plain number (its thread touches no Prometheus object), copied
    into ``counter`` at each refresh: what it grew by since the last one."""

    def __init__(self, counter: Counter, read: Callable[[], int]) -> None:
        self.counter = counter
        self.read = read
        self.counted = 0

    def refresh(self) -> None:
        value = self.read()
        if value > self.counted:
            self.counter.inc(value - self.counted)
            self.counted = value


class Metrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int],
                 drained: Callable[[], int] = lambda: 0, prefix_cached: Callable[[], int] = lambda: 0) -> None:
        # The *_created series double the output and no dashboard here reads them (process-wide switch).
        disable_created_metrics()
        self.multiprocess = multiprocess_mode()
        self._read_running = running
        self._read_waiting = waiting
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("rivulet_requests_running", "Requests in the engine's running batch.", registry=r,
                             multiprocess_mode="livesum")
        self.waiting = Gauge("rivulet_requests_waiting", "Requests queued for the engine.", registry=r,
                             multiprocess_mode="livesum")
        if not self.multiprocess:
            # A callback gauge cannot cross processes (the merge reads files, not this process's
            # callables): in multiprocess mode refresh_engine_gauges() writes the values instead.
            self.running.set_function(running)
            self.waiting.set_function(waiting)
        self.requests = Counter("rivulet_requests_total", "Finished HTTP requests.", ["route", "status"],
                                registry=r)
        self.cancelled = Counter("rivulet_requests_cancelled_total",
                                 "Requests aborted before they finished (client gone, DELETE).", registry=r)
        self.time_to_first_token = Histogram("rivulet_time_to_first_token_seconds",
                                             "From a request's arrival to its first text.",
                                             buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("rivulet_inter_token_latency_seconds",
                                             "Time per generated token after the first.",
                                             buckets=_ITL_BUCKETS, registry=r)
        self.generated_tokens = Counter("rivulet_generated_tokens_total", "Completion tokens generated.",
                                        registry=r)
        # Labels stay bounded: the method (token, aksk, app_signature, app_code, signature, none) and "ok" or
        # one of service/auth's fixed failure codes; key ids go to the request log, never into a label.
        self.auth_requests = Counter("rivulet_auth_requests_total",
                                     "Authentication decisions on non-public routes, by method and outcome.",
                                     ["method", "outcome"], registry=r)
        self.open_streams = Gauge("rivulet_open_streams", "Event streams with a connected client.", registry=r,
                                  multiprocess_mode="livesum")
        # A model package's requests whose client left (or timed out) while infer ran on to its end: the
        # engine thread stayed busy with them (models/package.py, drain on cancel). Counted by the engine,
        # copied here at each refresh and scrape.
        self.package_drained = Counter("rivulet_package_drained_total",
                                       "Package requests whose infer ran on after their client left.", registry=r)
        # Prompt tokens whose keys and values a request copied from a running request's cache instead of
        # computing them (models/prefix_cache.py): how much a shared system prompt saves.
        self.prefix_cached_tokens = Counter("rivulet_prefix_cached_tokens_total",
                                            "Prompt tokens copied from a running request's cache (prefix caching).",
                                            registry=r)
        self._engine_counts = [EngineCount(self.package_drained, drained),
                               EngineCount(self.prefix_cached_tokens, prefix_cached)]

    @contextlib.contextmanager
    def open_stream(self) -> Iterator[None]:
        self.open_streams.inc()
        try:
            yield
        finally:
            self.open_streams.dec()

    def refresh_engine_gauges(self) -> None:
        """Copy the engine's counts; in multiprocess mode also write this worker's running/waiting
        counts to its file."""
        for count in self._engine_counts:
            count.refresh()
        if self.multiprocess:
            self.running.set(self._read_running())
            self.waiting.set(self._read_waiting())

    def render(self) -> tuple[bytes, str]:
        if not self.multiprocess:
            self.refresh_engine_gauges()
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.refresh_engine_gauges()
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST


def keep_engine_gauges_fresh(metrics: Metrics, interval_s: float = ENGINE_GAUGES_REFRESH_S) -> Any:
    """In a gunicorn worker: a greenlet that refreshes the engine gauges every ``interval_s``, so a
    scrape answered by another worker sees this one's queue (the autoscaler reads it). None in
    single-process mode, where the gauges are read at scrape time."""
    if not metrics.multiprocess:
        return None
    import gevent

    def refresh_forever() -> None:
        while True:
            metrics.refresh_engine_gauges()
            gevent.sleep(interval_s)

    return gevent.spawn(refresh_forever)

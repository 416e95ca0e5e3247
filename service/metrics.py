"""Prometheus metrics, one registry per app (so tests can build several apps in one process).

Names are DESIGN.md's. ``rivulet_requests_running`` / ``_waiting`` are read from the engine at scrape
time; the rest are counted by the request pipeline (service/jobs.py) and the request log.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest,
)

# Latency buckets from a fast GPU step (~5 ms) to a long CPU prefill or a deep queue.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        # The *_created series double the output and no dashboard here reads them (process-wide switch).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("rivulet_requests_running", "Requests in the engine's running batch.", registry=r)
        self.running.set_function(running)
        self.waiting = Gauge("rivulet_requests_waiting", "Requests queued for the engine.", registry=r)
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
        self.open_streams = Gauge("rivulet_open_streams", "Event streams with a connected client.", registry=r)

    @contextlib.contextmanager
    def open_stream(self) -> Iterator[None]:
        self.open_streams.inc()
        try:
            yield
        finally:
            self.open_streams.dec()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

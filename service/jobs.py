"""The request pipeline: submit a validated request to the engine, read its stream back as payloads.

Every route that runs the model goes through here: the OpenAI routes, ``/v1/sse``, model packages'
routes and the resumable streams. How to use it (from a greenlet, with the app's ``Runtime``)::

    from service.jobs import DONE, HEARTBEAT, start_job

    job = start_job(runtime, "chat", body)   # kind: "chat" | "completion" | "package" | "auto"
    try:
        for payload in job:                  # waits at most RIVULET_HEARTBEAT_S between payloads
            if payload is HEARTBEAT:         # quiet that long: send ": ping" (or just check your reader)
                continue
            if payload == DONE:              # always the last payload, exactly once
                break
            ...                              # a dict: an OpenAI chunk, a package output, or {"error": ...}
    finally:
        job.close()                          # the stream did not finish (client gone): abort the work

``start_job`` raises ``models.errors`` types (InvalidRequest, ContextLengthExceeded, QueueFull,
EngineUnavailable) before anything is submitted; ``service/errors.py`` turns them into JSON answers.
Once submitted, every failure arrives in the stream as ``{"error": {"message", "type", "code"}}``
followed by ``DONE``: nothing is ever lost silently. In particular, if the engine has not ended the
request by its deadline plus ``SAFETY_MARGIN_S``, the job ends it itself with a timeout error and aborts
the engine's work.

- ``job.abort()`` (from any greenlet, e.g. a DELETE) cancels the work; the stream then ends with a
  ``cancelled`` error event and ``DONE``. ``close()`` is ``abort()`` for a reader that leaves.
- ``job.events()`` is the raw stream (the engine's events and HEARTBEAT), for readers that assemble one
  answer instead of a stream (service/answers.py).
- "auto" picks what the served model takes (service/requests.py). ``job.stream`` says whether the body
  asked for a stream.
- ``job.request_id``, ``prompt_tokens``, ``completion_tokens``, ``time_to_first_token_s``,
  ``finish_reason`` describe the request once read (for logs).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from models.api import CANCELLED, COMPLETED, TIMEOUT, Finished, GenerationRequest, PackageOutput, TextDelta
from models.errors import EngineUnavailable, error_for
from models.serving import PACKAGE
from service.channel import Channel
from service.errors import cancelled_payload, stream_error_payload
from service.lifecycle import Runtime
from service.metrics import observe_many
from service.openai_stream import CHAT, COMPLETION, ResponseShape
from service.request_log import new_request_id
from service.requests import AUTO, build_request
from service.sse import DONE

__all__ = ["AUTO", "CHAT", "COMPLETION", "DONE", "HEARTBEAT", "Job", "PACKAGE", "start_job"]


class _Heartbeat:
    def __repr__(self) -> str:
        return "HEARTBEAT"


HEARTBEAT = _Heartbeat()
# A stream's per-token metrics (tokens generated, inter-token gaps) are written this often, and when it
# ends: writing them at every token was a fifth of the hub's work per token (service/metrics.py).
METRICS_FLUSH_S = 0.5
# How long past its deadline a request may run before the job ends it without waiting for the engine
# (the engine checks deadlines between steps; one long step or a stuck package must not hold a stream).
SAFETY_MARGIN_S = 2.0

Payload = dict[str, Any] | str | _Heartbeat


def start_job(runtime: Runtime, kind: str, body: Any, *, request_id: str | None = None) -> Job:
    """Validate ``body`` for ``kind`` (service/requests.py), submit it, and return its Job. Raises
    models.errors types (InvalidRequest, ContextLengthExceeded, QueueFull, EngineUnavailable)."""
    started = time.monotonic()
    request_id = request_id or new_request_id()
    deadline = started + runtime.settings.request_timeout_s
    built = build_request(runtime.model, kind, body, request_id, deadline)
    job = Job(runtime, request_id, built.kind, started, deadline, stream=built.stream, shape=built.shape)
    job._submit(built.request)
    return job


class Job:
    """One submitted request and its stream. Iterate it once; see the module docstring."""

    def __init__(self, runtime: Runtime, request_id: str, kind: str, started: float, deadline: float, *,
                 stream: bool, shape: ResponseShape | None = None) -> None:
        self.request_id = request_id
        self.kind = kind
        self.stream = stream
        self.started = started
        self.deadline = deadline
        self._engine = runtime.engine
        self._metrics = runtime.metrics
        self._heartbeat_s = runtime.settings.heartbeat_s
        self._bridge = runtime.bridge
        self.shape = shape
        self._ticket: Ticket | None = None
        self._channel: Channel | None = None
        self._iterated = False
        self._aborted = False
        self.finished = False
        self.prompt_tokens: int | None = None
        self.completion_tokens = 0
        self.time_to_first_token_s: float | None = None
        self.finish_reason: str | None = None
        self._counted_tokens = 0
        self._last_text_at: float | None = None
        self._gaps: list[float] = []  # inter-token gaps not yet written to the histogram
        self._metrics_written_at = started

    @property
    def ticket(self) -> Ticket | None:
        """The engine's handle on this request (read-only use: its state, its cancel reason)."""
        return self._ticket

    def _submit(self, request: Any) -> None:
        if self._bridge is None:
            raise EngineUnavailable("the model is still loading")
        self._channel = self._bridge.channel()
        self._ticket = self._engine.submit(request, self._channel)
        if isinstance(request, GenerationRequest):
            self.prompt_tokens = len(request.prompt_ids)

    # --- control ----------------------------------------------------------------------------

    def abort(self, reason: str = CANCELLED) -> None:
        """Drop the engine's work. Safe to call twice, or after the end (then it does nothing)."""
        if self.finished or self._aborted or self._ticket is None:
            return
        self._aborted = True
        self._engine.abort(self._ticket, reason)
        if reason == CANCELLED:
            self._metrics.cancelled.inc()

    def close(self) -> None:
        """The reader is done: if the stream did not finish, the client left, so the work is cancelled."""
        self.abort(CANCELLED)
        self._write_token_metrics()

    # --- reading ----------------------------------------------------------------------------

    def has_waiting_events(self) -> bool:
        """Whether the engine's next event is already here: reading the next payload will not wait."""
        return self._channel is not None and self._channel.waiting() > 0

    def __iter__(self) -> Iterator[Payload]:
        if self._iterated:
            raise RuntimeError("a Job's stream can be read only once")
        self._iterated = True
        return self._payloads()

    def _payloads(self) -> Iterator[Payload]:
        for event in self.events():
            if event is HEARTBEAT:
                yield HEARTBEAT
            elif isinstance(event, TextDelta):
                yield self.shape.text_chunk(event.text, event.logprobs)
            elif isinstance(event, PackageOutput):
                yield event.data  # the package's own dict, already a JSON-only copy
            else:
                yield from self._ending(event)
                yield DONE
                return

    def _ending(self, finished: Finished) -> Iterator[dict[str, Any]]:
        if finished.reason == CANCELLED:
            yield cancelled_payload()
        elif finished.error is not None or finished.reason not in COMPLETED:
            yield stream_error_payload(finished.error)
        elif self.shape is not None:
            yield self.shape.final_chunk(finished.reason)
            if self.shape.include_usage:
                yield self.shape.usage_chunk(finished.prompt_tokens, finished.completion_tokens)

    def events(self, quiet_s: float | None = None) -> Iterator[TextDelta | PackageOutput | Finished | _Heartbeat]:
        """The engine's events, HEARTBEAT when quiet for ``quiet_s`` (default RIVULET_HEARTBEAT_S), and a
        synthetic timeout when the engine overruns."""
        quiet_s = quiet_s or self._heartbeat_s
        safety_deadline = self.deadline + SAFETY_MARGIN_S
        last_sent = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= safety_deadline:
                self.abort(TIMEOUT)
                yield self._note_finished(Finished(TIMEOUT, 0, self.completion_tokens, error_for(TIMEOUT)))
                return
            event = self._channel.get(timeout=min(last_sent + quiet_s, safety_deadline) - now)
            if event is None:
                if time.monotonic() - last_sent >= quiet_s:
                    last_sent = time.monotonic()
                    yield HEARTBEAT
                continue
            last_sent = time.monotonic()
            if isinstance(event, Finished):
                yield self._note_finished(event)
                return
            self._note_output(event, last_sent)
            yield event

    def _note_output(self, event: TextDelta | PackageOutput, now: float) -> None:
        if self.time_to_first_token_s is None:
            self.time_to_first_token_s = now - self.started
            self._metrics.time_to_first_token.observe(self.time_to_first_token_s)
        if isinstance(event, PackageOutput):
            self.completion_tokens += 1  # a package's unit of output: an event sent to the client
        else:
            new_tokens = event.completion_tokens - self.completion_tokens
            if self._last_text_at is not None and new_tokens > 0:
                self._gaps.append((now - self._last_text_at) / new_tokens)
            self._last_text_at = now
            self.completion_tokens = event.completion_tokens
        if now - self._metrics_written_at >= METRICS_FLUSH_S:
            self._write_token_metrics(now)

    def _note_finished(self, event: Finished) -> Finished:
        self.finished = True
        self.finish_reason = event.reason
        self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        self._write_token_metrics()
        return event

    def _write_token_metrics(self, now: float | None = None) -> None:
        """Write the tokens and gaps counted since the last time (at most METRICS_FLUSH_S ago)."""
        self._metrics_written_at = time.monotonic() if now is None else now
        if self._gaps:
            observe_many(self._metrics.inter_token_latency, self._gaps)
            self._gaps = []
        if self.completion_tokens > self._counted_tokens:
            self._metrics.generated_tokens.inc(self.completion_tokens - self._counted_tokens)
            self._counted_tokens = self.completion_tokens

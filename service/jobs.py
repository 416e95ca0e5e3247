"""The request pipeline: validate a body, submit it to the engine, read its stream back as payloads.

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
- ``job.collect(client_gone)`` reads the whole stream and returns one object (a non-streaming OpenAI
  response, or a package's single output), raising the error instead if the request failed, and
  ``ClientGone`` (after cancelling the work) as soon as ``client_gone()`` says the client has hung up.
- "auto" picks what the served model takes: a package's inputs, else chat when the body has
  ``messages``, else a completion. ``job.stream`` says whether the body asked for a stream.
- ``job.request_id``, ``prompt_tokens``, ``completion_tokens``, ``time_to_first_token_s``,
  ``finish_reason`` describe the request once read (for logs).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from models.api import Finished, GenerationRequest, PackageOutput, TextDelta, TokenLogprob
from models.errors import (
    ClientGone, ContextLengthExceeded, EngineUnavailable, InvalidRequest, RequestTimeout, RivuletError,
)
from models.scheduler import Ticket
from service.channel import Channel
from service.errors import cancelled_payload, stream_error_payload
from service.lifecycle import Runtime
from service.openai_schemas import ChatRequest, CompletionRequest, parse
from service.openai_stream import CHAT, COMPLETION, ResponseShape
from service.package_jobs import build_package_request, package_payload
from service.request_log import new_request_id

PACKAGE, AUTO = "package", "auto"
KINDS = (CHAT, COMPLETION, PACKAGE, AUTO)
DONE = "[DONE]"


class _Heartbeat:
    def __repr__(self) -> str:
        return "HEARTBEAT"


HEARTBEAT = _Heartbeat()
# How long past its deadline a request may run before the job ends it without waiting for the engine
# (the engine checks deadlines between steps; one long step or a stuck package must not hold a stream).
SAFETY_MARGIN_S = 2.0
# How often a non-streaming request, which has nothing to write until the end, looks for a gone client
# while the engine is quiet (queued, or in a long prefill); during generation it looks at every token.
DISCONNECT_PROBE_S = 1.0

Payload = dict[str, Any] | str | _Heartbeat


def start_job(runtime: Runtime, kind: str, body: Any, *, request_id: str | None = None) -> Job:
    """Validate ``body`` for ``kind``, submit it, and return its Job. Raises models.errors types."""
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    started = time.monotonic()
    request_id = request_id or new_request_id()
    deadline = started + runtime.settings.request_timeout_s
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    kind = _resolve_kind(runtime, kind, body)
    if kind == PACKAGE:
        request = build_package_request(runtime.backend, body, request_id, deadline)
        job = Job(runtime, request_id, kind, started, deadline, stream=True, package_payload=package_payload)
    else:
        request, parsed = _generation_request(runtime, kind, body, request_id, deadline)
        shape = ResponseShape(kind, request_id, runtime.model_name, include_usage=parsed.include_usage,
                              token_bytes=runtime.backend.tokenizer.token_bytes
                              if parsed.requested_logprobs is not None else None)
        job = Job(runtime, request_id, kind, started, deadline, stream=parsed.stream, shape=shape)
    job._submit(request)
    return job


def _resolve_kind(runtime: Runtime, kind: str, body: dict[str, Any]) -> str:
    is_package = runtime.backend.kind == PACKAGE
    if kind == AUTO:
        if is_package:
            return PACKAGE
        if "messages" in body:
            return CHAT
        if "prompt" in body:
            return COMPLETION
        raise InvalidRequest("the body needs 'messages' (a chat) or 'prompt' (a completion)", param="messages")
    if is_package and kind != PACKAGE:
        raise InvalidRequest(f"this server runs the model package '{runtime.model_name}', not an LLM: "
                             "POST its inputs to /v1/sse")
    if not is_package and kind == PACKAGE:
        raise InvalidRequest(f"this server runs the LLM '{runtime.model_name}': send a chat or completion body")
    return kind


def _generation_request(runtime: Runtime, kind: str, body: dict[str, Any], request_id: str,
                        deadline: float) -> tuple[GenerationRequest, ChatRequest | CompletionRequest]:
    backend: Any = runtime.backend
    tokenizer = backend.tokenizer
    parsed: ChatRequest | CompletionRequest
    if kind == CHAT:
        parsed = parse(ChatRequest, body)
        messages = [m.for_template() for m in parsed.messages]
        _refuse_oversized(runtime, sum(len(m["content"]) for m in messages), "messages")
        prompt_ids = tokenizer.encode_chat(messages)
        prompt_param = "messages"
    else:
        parsed = parse(CompletionRequest, body)
        prompt = parsed.single_prompt()
        prompt_param = "prompt"
        if isinstance(prompt, str):
            _refuse_oversized(runtime, len(prompt), "prompt")
            prompt_ids = tokenizer.encode_prompt(prompt)
        else:
            prompt_ids = list(prompt)
            if any(token >= tokenizer.vocab_size for token in prompt_ids):
                raise InvalidRequest(f"prompt: token ids must be below the vocabulary size {tokenizer.vocab_size}",
                                     param="prompt")
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param=prompt_param)
    context = backend.context_length
    room = context - len(prompt_ids)
    if room <= 0:
        raise ContextLengthExceeded(
            f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens", param=prompt_param)
    # Unset max_tokens means "until the model stops or the context is full" (bounded by the request timeout).
    max_tokens = parsed.requested_max_tokens or room
    if max_tokens > room:
        raise ContextLengthExceeded(
            f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's context "
            f"of {context} tokens; ask for at most {room}", param="max_tokens")
    request = GenerationRequest(request_id, prompt_ids, parsed.sampling(max_tokens), deadline)
    return request, parsed


def _refuse_oversized(runtime: Runtime, characters: int, param: str) -> None:
    if characters > runtime.prompt_char_limit:
        raise ContextLengthExceeded(
            f"the prompt is {characters} characters, more than this model's context of "
            f"{runtime.backend.context_length} tokens can hold", param=param)


class Job:
    """One submitted request and its stream. Iterate it once; see the module docstring."""

    def __init__(self, runtime: Runtime, request_id: str, kind: str, started: float, deadline: float, *,
                 stream: bool, shape: ResponseShape | None = None,
                 package_payload: Callable[[PackageOutput], dict[str, Any]] | None = None) -> None:
        self.request_id = request_id
        self.kind = kind
        self.stream = stream
        self.started = started
        self.deadline = deadline
        self._engine = runtime.engine
        self._metrics = runtime.metrics
        self._heartbeat_s = runtime.settings.heartbeat_s
        self._bridge = runtime.bridge
        self._shape = shape
        self._package_payload = package_payload
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

    def abort(self, reason: str = "cancelled") -> None:
        """Drop the engine's work. Safe to call twice, or after the end (then it does nothing)."""
        if self.finished or self._aborted or self._ticket is None:
            return
        self._aborted = True
        self._engine.abort(self._ticket, reason)
        if reason == "cancelled":
            self._metrics.cancelled.inc()

    def close(self) -> None:
        """The reader is done: if the stream did not finish, the client left, so the work is cancelled."""
        self.abort("cancelled")

    # --- reading ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Payload]:
        if self._iterated:
            raise RuntimeError("a Job's stream can be read only once")
        self._iterated = True
        return self._payloads()

    def _payloads(self) -> Iterator[Payload]:
        for event in self._events():
            if event is HEARTBEAT:
                yield HEARTBEAT
            elif isinstance(event, TextDelta):
                yield self._shape.text_chunk(event.text, event.logprobs)
            elif isinstance(event, PackageOutput):
                yield self._package_payload(event)
            else:
                yield from self._ending(event)
                yield DONE
                return

    def _ending(self, finished: Finished) -> Iterator[dict[str, Any]]:
        if finished.reason == "cancelled":
            yield cancelled_payload()
        elif finished.error is not None or finished.reason not in ("stop", "length"):
            yield stream_error_payload(finished.error)
        elif self._shape is not None:
            yield self._shape.final_chunk(finished.reason)
            if self._shape.include_usage:
                yield self._shape.usage_chunk(finished.prompt_tokens, finished.completion_tokens)

    def _events(self, quiet_s: float | None = None) -> Iterator[TextDelta | PackageOutput | Finished | _Heartbeat]:
        """The engine's events, HEARTBEAT when quiet for ``quiet_s`` (default RIVULET_HEARTBEAT_S), and a
        synthetic timeout when the engine overruns."""
        quiet_s = quiet_s or self._heartbeat_s
        safety_deadline = self.deadline + SAFETY_MARGIN_S
        last_sent = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= safety_deadline:
                self.abort("timeout")
                yield self._note_finished(Finished(
                    "timeout", 0, self.completion_tokens,
                    RequestTimeout("the request ran past its time limit (RIVULET_REQUEST_TIMEOUT_S)")))
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
        if isinstance(event, TextDelta):
            new_tokens = event.completion_tokens - self.completion_tokens
            if self._last_text_at is not None and new_tokens > 0:
                self._metrics.inter_token_latency.observe((now - self._last_text_at) / new_tokens)
            self._last_text_at = now
            self.completion_tokens = event.completion_tokens
            self._count_tokens()

    def _note_finished(self, event: Finished) -> Finished:
        self.finished = True
        self.finish_reason = event.reason
        self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        self._count_tokens()
        return event

    def _count_tokens(self) -> None:
        if self.completion_tokens > self._counted_tokens:
            self._metrics.generated_tokens.inc(self.completion_tokens - self._counted_tokens)
            self._counted_tokens = self.completion_tokens

    def collect(self, client_gone: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Read the whole stream. -> the non-streaming response (or a package's last output). Raises on error.

        A non-streaming answer writes nothing until the end, so a client that hangs up is not noticed by
        a failed write: ``client_gone`` is asked after every event and every DISCONNECT_PROBE_S of quiet,
        and once it says yes the work is cancelled and ``ClientGone`` raised.
        """
        texts: list[str] = []
        logprobs: list[TokenLogprob] = []
        last_output: dict[str, Any] | None = None
        try:
            for event in self._events(quiet_s=min(self._heartbeat_s, DISCONNECT_PROBE_S)):
                if client_gone is not None and not isinstance(event, Finished) and client_gone():
                    raise ClientGone("the client closed the connection before the answer was ready")
                if isinstance(event, TextDelta):
                    texts.append(event.text)
                    logprobs.extend(event.logprobs)
                elif isinstance(event, PackageOutput):
                    last_output = self._package_payload(event)
                elif isinstance(event, Finished):
                    return self._whole(event, "".join(texts), tuple(logprobs), last_output)
        finally:
            self.close()
        raise RivuletError("the stream ended without a result")  # unreachable: _events ends with Finished

    def _whole(self, finished: Finished, text: str, logprobs: tuple[TokenLogprob, ...],
               last_output: dict[str, Any] | None) -> dict[str, Any]:
        if finished.reason == "cancelled":
            raise RivuletError("the request was cancelled")
        if finished.error is not None or finished.reason not in ("stop", "length"):
            error = finished.error
            raise error if isinstance(error, RivuletError) else RivuletError(f"the request failed: {error}")
        if self._shape is None:
            return last_output or {}
        return self._shape.whole(text, finished.reason, finished.prompt_tokens, finished.completion_tokens, logprobs)

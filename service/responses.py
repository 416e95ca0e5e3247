"""The two ways a job's answer leaves: as an event stream, or as one JSON object at its end."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from flask import Response, jsonify

from models.api import CANCELLED
from models.errors import RivuletError
from service import sse
from service.answers import collect
from service.client_socket import client_gone, client_socket, on_hang_up, socket_closed
from service.errors import stream_error_payload
from service.http import runtime
from service.jobs import DONE, HEARTBEAT, Job
from service.request_log import RequestRecord, current_record

log = logging.getLogger("rivulet.service")
# At most this many events go out in one write when a stream has fallen behind (a few kB of SSE).
MAX_EVENTS_PER_WRITE = 64


def whole_answer(job: Job) -> Response:
    """A non-streaming answer: the job read to its end as one JSON object. A client that hangs up
    meanwhile cancels the work (``ClientGone``, logged as 499), as it does for a stream."""
    try:
        return jsonify(collect(job, client_gone))
    finally:
        note_job(current_record(), job)


def note_job(record: RequestRecord, job: Job) -> None:
    """Copy what the job learned into the request's log line."""
    record.prompt_tokens = job.prompt_tokens
    record.completion_tokens = job.completion_tokens
    record.time_to_first_token_s = job.time_to_first_token_s
    record.finish_reason = job.finish_reason or (CANCELLED if not job.finished else None)


def stream_writes(job: Job, ids: sse.EventIds, hung_up: Callable[[], bool]) -> Iterator[bytes]:
    """``job``'s payloads as SSE bytes, one item per write: ``: ping`` for a heartbeat, then events up to
    ``[DONE]``. Before each write ``hung_up()`` is asked; True ends it (nothing more is written).

    Events already waiting when one is written (the stream fell behind the engine: a slow client, a busy
    hub) join that write, up to MAX_EVENTS_PER_WRITE: one send and one trip through the WSGI server for
    all of them, so the hub's work per token falls as its load rises (bench/README.md section 13)."""
    payloads = iter(job)
    for payload in payloads:
        if hung_up():
            return
        if payload is HEARTBEAT:
            yield sse.comment("ping")
            continue
        write = ids.event(payload)
        joined = 1
        while payload != DONE and joined < MAX_EVENTS_PER_WRITE and job.has_waiting_events():
            payload = next(payloads)  # an engine event already here: no wait, never a heartbeat
            write += ids.event(payload)
            joined += 1
        yield write
        if payload == DONE:
            return


def event_stream(job: Job) -> Response:
    """Send ``job`` as an event stream: ``retry:`` first, an ``id:`` on every event, ``: ping`` while quiet,
    ``[DONE]`` last. A client that hangs up is seen at once by the event loop (``on_hang_up``: the work is
    aborted even while queued, with nothing to write), before the next write (``socket_closed``, asked only
    once the watch is off: after it saw a close, so nothing more is written; while it is on it sees a close
    first, and asking before every token cost a system call and 14% of the hub's time at 64 streams,
    bench/README.md section 13), or when a write fails (after a pipelined request, whose bytes hide a close
    from both: gunicorn then closes this generator and
    ``GeneratorExit`` rises at its ``yield``); whichever comes first, the engine drops the work before its
    next step.
    A bug while streaming still ends the stream properly (an internal_error event, then ``[DONE]``)."""
    record = current_record()
    metrics = runtime().metrics
    sock = client_socket()  # the generator runs after the view returns, outside the request context

    def frames() -> Iterator[bytes]:
        ids = sse.EventIds()
        hang_up = on_hang_up(sock, job.close)
        with metrics.open_stream():
            try:
                yield sse.retry()
                try:
                    # A hang-up stops it: finally then cancels the work before the engine's next step.
                    yield from stream_writes(job, ids, lambda: not hang_up.watching and socket_closed(sock))
                except Exception:  # not GeneratorExit: a gone client is not an error
                    log.exception("stream %s failed", job.request_id)
                    yield ids.event(stream_error_payload(RivuletError("internal server error")))
                    yield ids.event(DONE)
            finally:
                hang_up.stop()
                job.close()
                note_job(record, job)

    return sse.response(frames())

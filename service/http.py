"""Small helpers the routes share: the runtime, the JSON body (size-limited), and streaming a Job as SSE."""
from __future__ import annotations

import _socket
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, g, jsonify, request

from models.errors import BodyTooLarge, InvalidRequest, RivuletError
from service import sse
from service.errors import stream_error_payload
from service.jobs import DONE, HEARTBEAT, Job
from service.lifecycle import Runtime
from service.request_log import RequestRecord, current_record

log = logging.getLogger("rivulet.service")


def runtime() -> Runtime:
    return current_app.extensions["rivulet"]


def json_body() -> Any:
    """The request's JSON, for every route that takes a body (use this, not ``request.get_json()``).

    Bodies over RIVULET_MAX_BODY_BYTES get 413 and are never read past the limit: at once when
    Content-Length says so (nothing is read), as soon as one byte past the limit arrives when chunked.
    """
    data = raw_body()
    if not data.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def raw_body() -> bytes:
    """The body's exact bytes, read once per request (a signature check hashes what json_body parses)."""
    if "rivulet_body" not in g:
        limit = runtime().settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"the request body is {request.content_length} bytes; the limit is {limit} "
                               "(RIVULET_MAX_BODY_BYTES)")
        g.rivulet_body = _read_at_most(limit)
    return g.rivulet_body


def _read_at_most(limit: int) -> bytes:
    # Werkzeug's own limit (MAX_CONTENT_LENGTH) silently truncates a chunked body at the limit, so the
    # app sets it one byte higher and the check is here: limit + 1 bytes read means too large.
    stream = request.stream
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise BodyTooLarge(f"the request body is larger than the limit of {limit} bytes (RIVULET_MAX_BODY_BYTES)")
    return b"".join(chunks)


_READ_CHUNK = 64 * 1024


def client_socket() -> Any:
    """This request's connection (gunicorn puts it in the environ); None outside gunicorn (test client)."""
    return request.environ.get("gunicorn.socket")


def socket_closed(sock: Any) -> bool:
    """Has the client closed ``sock``? Its request body is read, so the socket has bytes to read only when
    the client closed it (EOF) or pipelined its next request (data): a non-blocking peek tells which.
    Asking before a write catches a gone client at once; a write alone fails only at the second write
    after the close. No socket to look at: never closed.

    Only a definite answer counts as gone: EOF, a reset, or a socket already closed on our side. Anything
    else (no data yet, an error we cannot read) is "alive", and the next write decides. The probe never
    uses ``select``, which cannot take a descriptor of 1024 or more (every stream past the first
    thousand or so would look gone), and never the gevent socket's ``recv``, which waits for data.
    """
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return True  # closed on our side already
    probe = _socket.socket(fileno=fd)  # the C socket: no gevent wait, no select; borrowed, never closed
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # nothing to read: the client is still there
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return True
    except OSError:
        return False  # could not tell: let the next write decide
    finally:
        probe.detach()


def client_gone() -> bool:
    """Has the client of the current request hung up? (For use inside a request context.)"""
    return socket_closed(client_socket())


def whole_answer(job: Job) -> Response:
    """A non-streaming answer: the job read to its end as one JSON object. A client that hangs up
    meanwhile cancels the work (``ClientGone``, logged as 499), as it does for a stream."""
    try:
        return jsonify(job.collect(client_gone))
    finally:
        note_job(current_record(), job)


def note_job(record: RequestRecord, job: Job) -> None:
    """Copy what the job learned into the request's log line."""
    record.prompt_tokens = job.prompt_tokens
    record.completion_tokens = job.completion_tokens
    record.time_to_first_token_s = job.time_to_first_token_s
    record.finish_reason = job.finish_reason or ("cancelled" if not job.finished else None)


def event_stream(job: Job) -> Response:
    """Send ``job`` as an event stream: ``retry:`` first, an ``id:`` on every event, ``: ping`` while quiet,
    ``[DONE]`` last. A client that hangs up is seen before the next write (``socket_closed``), or makes
    a write fail (gunicorn then closes this generator and ``GeneratorExit`` rises at its ``yield``);
    either way ``finally`` aborts the engine's work.
    A bug while streaming still ends the stream properly (an internal_error event, then ``[DONE]``)."""
    record = current_record()
    metrics = runtime().metrics
    sock = client_socket()  # the generator runs after the view returns, outside the request context

    def frames() -> Iterator[bytes]:
        ids = sse.EventIds()
        with metrics.open_stream():
            try:
                yield sse.retry()
                try:
                    for payload in job:
                        if socket_closed(sock):
                            return  # the client hung up: finally cancels the work before the next step
                        if payload is HEARTBEAT:
                            yield sse.comment("ping")
                        else:
                            yield ids.event(payload)
                            if payload == DONE:
                                return
                except Exception:  # not GeneratorExit: a gone client is not an error
                    log.exception("stream %s failed", job.request_id)
                    yield ids.event(stream_error_payload(RivuletError("internal server error")))
                    yield ids.event(DONE)
            finally:
                job.close()
                note_job(record, job)

    return sse.response(frames())

"""Small helpers the routes share: the runtime, the JSON body (size-limited), and streaming a Job as SSE."""
from __future__ import annotations

import _socket
import logging
import socket
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, jsonify, request

from models.errors import RivuletError
from service import sse
from service.body import json_body  # noqa: F401 (re-exported: the routes import it from here)
from service.errors import stream_error_payload
from service.jobs import DONE, HEARTBEAT, Job
from service.lifecycle import Runtime
from service.request_log import RequestRecord, current_record

log = logging.getLogger("rivulet.service")


def runtime() -> Runtime:
    return current_app.extensions["rivulet"]


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

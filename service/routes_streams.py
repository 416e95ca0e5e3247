"""Resumable streams for browsers' ``EventSource`` (the demo page, service/routes_demo.py, uses them).

- ``POST /v1/streams`` (API key): the body of ``/v1/chat/completions``, ``/v1/completions`` or a model
  package's ``/v1/sse``; which one is ``kind`` ("chat", "completion", "package"), as a query parameter
  or a body field, else guessed like ``/v1/sse`` does. Starts the work; answers 201 ``{id, url}``.
- ``GET /v1/streams/{id}`` (no key: the unguessable id is the capability, and EventSource cannot send
  headers): the events after ``Last-Event-ID`` (header, or ``lastEventId`` query parameter), then the
  rest as it is generated. Every event has its sequence number as ``id``; the last is ``event: done``
  with ``data: [DONE]``. 204 once the last event was seen (EventSource stops), 404 when unknown,
  cancelled or expired. If the bounded buffer dropped events the reader asks for, it gets an error
  event (``code: stream_events_dropped``) and ``done``: the stream cannot be resumed without a gap.
  With a shared store (``RIVULET_STREAM_STORE=redis://...``) any replica serves any stream; the store
  unreachable is a 503 before the stream starts, an error event (``stream_store_unavailable``) after.
- ``DELETE /v1/streams/{id}`` (no key, same capability): cancels the work and forgets the stream; 204.
- ``POST /v1/streams/{id}/drop-readers`` (only with RIVULET_TEST_HOOKS): ends the stream's open GET
  connections without their last event, as a network drop would, so tests can watch a resume.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request, url_for

from models.errors import InvalidRequest, NotFound
from service import sse
from service.auth import public
from service.errors import cancelled_payload, stream_error_payload
from service.http import json_body, runtime
from service.jobs import AUTO, CHAT, COMPLETION, DONE, HEARTBEAT, PACKAGE, start_job
from service.metrics import Metrics
from service.request_log import RequestRecord, current_record
from service.responses import note_job
from service.resumable import DONE_EVENT, DROPPED, GONE, Gap, ResumableStreams
from service.stream_store import StoreBounds, StoredEvent, StoreUnavailable, StreamGone, open_store

bp = Blueprint("streams", __name__)
log = logging.getLogger("rivulet.streams")

_EVENT_ID = re.compile(r"[0-9]{1,18}")
KINDS = {"chat": CHAT, "completion": COMPLETION, "package": PACKAGE}
_EXTENSION = "rivulet_streams"


def streams() -> ResumableStreams:
    """This app's resumable streams, created on first use from the settings."""
    found = current_app.extensions.get(_EXTENSION)
    if found is None:
        settings = runtime().settings
        store = open_store(settings.stream_store, StoreBounds(
            max_events=settings.stream_max_events,
            max_bytes=settings.stream_max_bytes,
            total_bytes=settings.stream_total_bytes,
            retention_s=settings.stream_retention_s,
        ))
        found = ResumableStreams(store, reader_grace_s=settings.stream_reader_grace_s,
                                 heartbeat_s=settings.heartbeat_s)
        current_app.extensions[_EXTENSION] = found
    return found


def wait_for_stream_work(app: Flask, timeout: float) -> None:
    """At worker exit: with a shared store, let this worker's resumable streams finish (or end with the
    engine's shutdown event) and store their last events, up to ``timeout``. Their readers may be on
    other replicas, so no open connection here holds the worker for them as it does for direct streams.
    With the memory store nobody could read them after the exit: nothing to wait for."""
    found: ResumableStreams | None = app.extensions.get(_EXTENSION)
    if found is None or found.store.backend == "memory":
        return
    left = found.wait_for_work(timeout)
    if left:
        log.warning("%d resumable streams still running at exit: their readers will find them expired", left)


def _kind(body: Any) -> str:
    """The query parameter wins; the body's field is removed either way (a package's schema would
    refuse a field it does not know)."""
    in_body = body.pop("kind", None) if isinstance(body, dict) else None
    kind = request.args.get("kind", in_body)
    if kind is None:
        return AUTO
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(KINDS)} (or left out to guess it from the body)",
                             param="kind")
    return KINDS[kind]


def _last_event_id() -> tuple[int, str]:
    """-> (the id, where it came from). The header wins over the query parameter: on a reconnect
    EventSource sends the header with the newer id, while the URL keeps the id it was opened with."""
    raw = request.headers.get("Last-Event-ID")
    param = "Last-Event-ID"
    if raw is None:
        raw, param = request.args.get("lastEventId"), "lastEventId"
    if raw is None or not raw.strip():
        return 0, param
    if not _EVENT_ID.fullmatch(raw.strip()):
        raise InvalidRequest(f"{param} must be the id of an event of this stream (a number), not {raw!r}",
                             param=param)
    return int(raw), param


@bp.post("/v1/streams")
def create_stream() -> tuple[Response, int, dict[str, str]]:
    body = json_body()
    kind = _kind(body)
    record = current_record()
    stream_id = streams().open(lambda: start_job(runtime(), kind, body, request_id=record.request_id))
    url = url_for(".read_stream", stream_id=stream_id)
    return jsonify({"id": stream_id, "url": url}), 201, {"Location": url}


@bp.get("/v1/streams/<stream_id>")
@public
def read_stream(stream_id: str) -> Response:
    resumable = streams()
    after, param = _last_event_id()
    first = resumable.store.read(stream_id, after)  # StreamGone: 404
    if after > first.last_id:
        raise InvalidRequest(f"{param} {after} is past this stream's last event ({first.last_id})", param=param)
    if first.finished and after == first.last_id:
        return Response(status=204)  # everything was seen: EventSource stops reconnecting
    # The generator runs after the view returned, outside the request context: take what it needs now.
    frames = _frames(resumable, stream_id, after, current_record(), runtime().metrics)
    return sse.response(frames)


def _frames(resumable: ResumableStreams, stream_id: str, after: int, record: RequestRecord,
            metrics: Metrics) -> Iterator[bytes]:
    job = resumable.job(stream_id)  # known while its work runs in this worker: its counts go to the log
    with metrics.open_stream():
        try:
            yield sse.retry()
            for item in resumable.follow(stream_id, after):
                if isinstance(item, StoredEvent):
                    after = item.id
                    yield sse.event(item.data, id=item.id, name=item.name)
                elif item is HEARTBEAT:
                    yield sse.comment("ping")
                elif isinstance(item, Gap):
                    yield from _final(after, _gap_payload(item, resumable))
                elif item is GONE:
                    yield from _final(after, cancelled_payload())
                elif item is DROPPED:
                    return  # end the connection mid-stream: the client reconnects with Last-Event-ID
        except StoreUnavailable as exc:
            # The events are not lost (they are in the store): the reader may resume from here later.
            yield from _final(after, stream_error_payload(exc))
        finally:
            if job is not None:
                note_job(record, job)


def _final(last_id: int, error: dict[str, Any]) -> Iterator[bytes]:
    """An error event and the done event, both carrying the reader's unchanged position: a reconnect
    from there would meet the same condition."""
    yield sse.event(error, id=last_id)
    yield sse.event(DONE, id=last_id, name=DONE_EVENT)


def _gap_payload(gap: Gap, resumable: ResumableStreams) -> dict[str, Any]:
    bounds = resumable.store.bounds
    return {"error": {
        "message": (f"events {gap.first} to {gap.last} of this stream were dropped from the replay buffer "
                    f"(bounds: {bounds.max_events} events, {bounds.max_bytes} bytes per stream); "
                    "it cannot be resumed without a gap"),
        "type": "invalid_request_error",
        "code": "stream_events_dropped",
    }}


@bp.delete("/v1/streams/<stream_id>")
@public
def delete_stream(stream_id: str) -> Response:
    if not streams().cancel(stream_id):
        raise StreamGone(f"no stream {stream_id!r}: unknown, expired or already deleted")
    return Response(status=204)


@bp.post("/v1/streams/<stream_id>/drop-readers")
def drop_readers(stream_id: str) -> Response:
    if not runtime().settings.test_hooks:
        raise NotFound("test hooks are off (RIVULET_TEST_HOOKS)")
    return jsonify({"dropped": streams().drop_readers(stream_id)})

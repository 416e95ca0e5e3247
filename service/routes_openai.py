"""The OpenAI-compatible routes and /v1/sse. Each view validates, submits, and returns a Response."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.http import json_body, runtime
from service.jobs import AUTO, CHAT, COMPLETION, start_job
from service.request_log import current_record
from service.responses import event_stream, whole_answer

bp = Blueprint("openai", __name__)


def _answer(kind: str, *, always_stream: bool = False) -> Response:
    job = start_job(runtime(), kind, json_body(), request_id=current_record().request_id)
    if always_stream or job.stream:
        return event_stream(job)
    return whole_answer(job)


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return _answer(CHAT)


@bp.post("/v1/completions")
def completions() -> Response:
    return _answer(COMPLETION)


@bp.post("/v1/sse")
def sse_stream() -> Response:
    """Always an event stream, whatever ``stream`` says: the served model's own request body."""
    return _answer(AUTO, always_stream=True)


@bp.get("/v1/models")
def models() -> Response:
    rt = runtime()
    return jsonify({"object": "list", "data": [{
        "id": rt.model_name, "object": "model", "created": rt.created, "owned_by": "rivulet",
        "kind": rt.model.kind,
    }]})

"""POST /v1/infer: a non-streaming model package's answer as one JSON object.

Streaming packages (``IS_STREAMING_OUTPUT = True``) answer on ``/v1/sse`` (service/routes_openai.py),
which serves every kind of model; this route exists for clients that want a plain request/response.
"""
from __future__ import annotations

from flask import Blueprint, Response

from models.errors import InvalidRequest
from service.http import json_body, runtime
from service.jobs import PACKAGE, start_job
from service.request_log import current_record
from service.responses import whole_answer

bp = Blueprint("package", __name__)


@bp.post("/v1/infer")
def infer() -> Response:
    rt = runtime()
    if rt.model.kind != PACKAGE:
        raise InvalidRequest(f"this server runs the LLM '{rt.model_name}', not a model package: use "
                             "/v1/chat/completions or /v1/completions")
    if rt.model.is_streaming:
        raise InvalidRequest(f"the package '{rt.model_name}' streams its output (IS_STREAMING_OUTPUT = True): "
                             "POST the same body to /v1/sse")
    job = start_job(rt, PACKAGE, json_body(), request_id=current_record().request_id)
    return whole_answer(job)

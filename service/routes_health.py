"""Liveness, readiness and metrics: public (no API key), cheap, and never touching the engine's thread."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.auth import public
from service.http import runtime

bp = Blueprint("health", __name__)


@bp.get("/health")
@public
def health() -> Response:
    """The process is up and serving HTTP (the model may still be loading)."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
@public
def ready() -> Response:
    """200 once the model is loaded and the engine is running; 503 while loading, draining or dead."""
    engine = runtime().engine
    body = {"status": engine.state, "model": runtime().model_name}
    if engine.error:
        body["error"] = engine.error
    response = jsonify(body)
    response.status_code = 200 if engine.ready else 503
    return response


@bp.get("/metrics")
@public
def metrics() -> Response:
    payload, content_type = runtime().metrics.render()
    return Response(payload, content_type=content_type)

"""Liveness, readiness and metrics: public (no API key), cheap, and never touching the engine's thread."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.auth import public
from service.http import runtime
from service.routes_streams import streams
from service.stream_store import StoreUnavailable

bp = Blueprint("health", __name__)


@bp.get("/health")
@public
def health() -> Response:
    """The process is up and serving HTTP (the model may still be loading)."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
@public
def ready() -> Response:
    """200 once the model is loaded and the engine is running; 503 while loading, draining or dead.

    The stream store's state is reported (``stream_store``) but does not decide the status: with Redis
    down only resumable streams fail (503 each), while direct streams work, and taking every replica
    out of the balancer for it would stop those too."""
    engine = runtime().engine
    body = {"status": engine.state, "model": runtime().model_name, "stream_store": _store_state()}
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


def _store_state() -> dict[str, object]:
    store = streams().store
    state: dict[str, object] = {"backend": store.backend, "reachable": True}
    try:
        store.ping()
    except StoreUnavailable as exc:
        state.update(reachable=False, error=exc.message)
    return state

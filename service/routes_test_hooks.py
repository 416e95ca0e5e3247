"""Test-only routes, registered only with RIVULET_TEST_HOOKS=true: never in production.

- ``POST /v1/test/engine-fault``: the engine's next step fails as a broken device would, so a test can
  watch every open stream end with an error event, /ready turn 503, and the worker come back by itself.
"""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.http import runtime

bp = Blueprint("test_hooks", __name__)


@bp.post("/v1/test/engine-fault")
def engine_fault() -> Response:
    runtime().engine.inject_fault()
    return jsonify({"injected": "engine-fault"})

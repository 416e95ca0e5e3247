"""GET /openapi.json: the OpenAPI 3.1 document of this server (service/openapi.py), public like /health."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from service.auth import public
from service.openapi import build_document

bp = Blueprint("docs", __name__)
_EXTENSION = "rivulet_openapi"


@bp.get("/openapi.json")
@public
def openapi() -> Response:
    # Built once per app: it depends only on the routes, the settings and the served model.
    document = current_app.extensions.get(_EXTENSION)
    if document is None:
        document = current_app.extensions[_EXTENSION] = build_document(current_app)
    return jsonify(document)

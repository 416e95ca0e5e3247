"""What every route needs first: this worker's runtime, and the request's body (service/body.py)."""
from __future__ import annotations

from flask import current_app

from service.body import json_body, raw_body  # noqa: F401 (re-exported: the routes import them from here)
from service.lifecycle import Runtime


def runtime() -> Runtime:
    return current_app.extensions["rivulet"]

"""The demo page (``GET /``) and its script: a browser client of the resumable streams."""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

from service.auth import public

bp = Blueprint("demo", __name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"


@bp.get("/")
@public
def demo_page() -> Response:
    return _static("index.html")


@bp.get("/demo/<path:filename>")
@public
def demo_file(filename: str) -> Response:
    """The page's script (a route of our own rather than a static folder, so it can be ``@public``)."""
    return _static(filename)


def _static(filename: str) -> Response:
    response = send_from_directory(STATIC_DIR, filename)
    response.headers["Cache-Control"] = "no-cache"  # a new version of the page shows at the next load
    return response

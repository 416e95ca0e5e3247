"""The one place where errors become HTTP: a status + JSON body before a stream starts, an event after.

Routes raise ``models.errors`` types; ``register(app)`` turns them (and Werkzeug's own 404/405/413)
into ``{"error": {"message", "type", "code", "param"}}``. Once a stream has started the status line is
gone, so ``stream_error_payload`` gives the ``data: {"error": ...}`` event instead.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from models.errors import (
    BodyTimeout, BodyTooLarge, ClientGone, EngineUnavailable, InvalidRequest, ModelError, NotFound, QueueFull,
    RequestTimeout, RivuletError, Shutdown, Unauthorized,
)

log = logging.getLogger("rivulet.service")

# Most specific first: ContextLengthExceeded is an InvalidRequest, so it is found through it.
_STATUS: tuple[tuple[type[RivuletError], int], ...] = (
    (InvalidRequest, 400),
    (Unauthorized, 401),
    (NotFound, 404),
    (BodyTimeout, 408),
    (BodyTooLarge, 413),
    (QueueFull, 429),
    (EngineUnavailable, 503),
    (Shutdown, 503),
    (RequestTimeout, 504),
    # nginx's "client closed request": nobody reads it, but the request log and metrics show it.
    (ClientGone, 499),
    (ModelError, 500),
)


def http_status(exc: RivuletError) -> int:
    for error_type, status in _STATUS:
        if isinstance(exc, error_type):
            return status
    return 500


def error_body(exc: RivuletError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "code": exc.code, "param": exc.param}}


def stream_error_payload(exc: BaseException | None) -> dict[str, Any]:
    """The ``data:`` of the error event that ends a stream which has already started."""
    if exc is None:
        exc = ModelError("the request ended without a result")
    elif not isinstance(exc, RivuletError):
        exc = ModelError(f"{type(exc).__name__}: {exc}")
    return {"error": {"message": exc.message, "type": exc.type, "code": exc.code}}


def cancelled_payload() -> dict[str, Any]:
    """Ends a stream whose request was cancelled by someone other than its reader (e.g. DELETE)."""
    return {"error": {"message": "the request was cancelled", "type": "cancelled", "code": "cancelled"}}


def error_response(exc: RivuletError) -> Response:
    response = jsonify(error_body(exc))
    response.status_code = http_status(exc)
    if isinstance(exc, QueueFull):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="rivulet"'
    return response


def _http_exception_error(exc: HTTPException) -> RivuletError:
    """Werkzeug's own errors (routing, method, body size) in our hierarchy."""
    description = exc.description or exc.name
    if isinstance(exc, RequestEntityTooLarge):
        return BodyTooLarge("the request body is larger than RIVULET_MAX_BODY_BYTES")
    if exc.code == 404:
        return NotFound(f"no route for {request.method} {request.path}")
    if exc.code == 405:
        description = f"{request.path} does not accept {request.method}"
    error = RivuletError(description)
    error.type = "invalid_request_error" if (exc.code or 500) < 500 else "internal_error"
    error.code = exc.name.lower().replace(" ", "_")
    return error


def protocol_error_body(status: int, reason: str, detail: str) -> dict[str, Any]:
    """gunicorn's own refusals, before any route runs (a malformed request line, a header too large), in
    the same shape as every other error: ``reason`` is the status text, ``detail`` what gunicorn saw."""
    return {"error": {"message": f"{reason}: {detail}" if detail else reason,
                      "type": "invalid_request_error" if status < 500 else "internal_error",
                      "code": reason.lower().replace(" ", "_"), "param": None}}


def register(app: Flask) -> None:
    @app.errorhandler(RivuletError)
    def _rivulet_error(exc: RivuletError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        error = _http_exception_error(exc)
        response = error_response(error)
        if not isinstance(error, BodyTooLarge):
            response.status_code = exc.code or 500
        # Keep what Werkzeug adds, e.g. Allow on 405.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(RivuletError("internal server error"))

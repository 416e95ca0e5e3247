"""gunicorn's own error responses in Rivulet's JSON shape.

A request gunicorn cannot parse (a malformed request line, an invalid header, a header block too large)
never reaches Flask: gunicorn answers it itself, by default with an HTML page. Clients of a JSON API
(the ``openai`` SDK, Postman, ``fetch``) then get a body they cannot read. ``install()``, called in each
worker, makes gunicorn write ``{"error": {...}}`` instead, with the same status and reason.
"""
from __future__ import annotations

import json
import socket

from gunicorn import util

from service.errors import protocol_error_body


def write_json_error(sock: socket.socket, status: int, reason: str, detail: str) -> None:
    body = json.dumps(protocol_error_body(status, reason, detail)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


def install() -> None:
    """gunicorn's workers call ``util.write_error`` for these responses: point it at ours."""
    util.write_error = write_json_error

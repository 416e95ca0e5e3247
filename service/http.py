"""What every route needs first: this worker's runtime, and the request's JSON body (size-limited)."""
from __future__ import annotations

import json
from typing import Any

from flask import current_app, g, request

from models.errors import BodyTooLarge, InvalidRequest
from service.lifecycle import Runtime


def runtime() -> Runtime:
    return current_app.extensions["rivulet"]


def json_body() -> Any:
    """The request's JSON, for every route that takes a body (use this, not ``request.get_json()``).

    Bodies over RIVULET_MAX_BODY_BYTES get 413 and are never read past the limit: at once when
    Content-Length says so (nothing is read), as soon as one byte past the limit arrives when chunked.
    """
    data = raw_body()
    if not data.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def raw_body() -> bytes:
    """The body's exact bytes, read once per request (a signature check hashes what json_body parses)."""
    if "rivulet_body" not in g:
        limit = runtime().settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"the request body is {request.content_length} bytes; the limit is {limit} "
                               "(RIVULET_MAX_BODY_BYTES)")
        g.rivulet_body = _read_at_most(limit)
    return g.rivulet_body


def _read_at_most(limit: int) -> bytes:
    # Werkzeug's own limit (MAX_CONTENT_LENGTH) silently truncates a chunked body at the limit, so the
    # app sets it one byte higher and the check is here: limit + 1 bytes read means too large.
    stream = request.stream
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise BodyTooLarge(f"the request body is larger than the limit of {limit} bytes (RIVULET_MAX_BODY_BYTES)")
    return b"".join(chunks)


_READ_CHUNK = 64 * 1024

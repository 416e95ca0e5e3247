"""Server-Sent Events framing: the only code that writes the event-stream wire format.

Payloads are JSON-encoded, and JSON escapes every control character, so a ``data:`` line never holds a
raw CR or LF: no model text can end an event early or forge a field. U+2028, U+2029 and U+0085 are
escaped too, for clients that split lines with ``str.splitlines``. String payloads (``[DONE]``), event
names, ids and comments are checked for line breaks and refused if they have one.

``retry:`` and ``: ping`` are written as single lines, with no blank line after them: they then join
the next event's block instead of forming one of their own. A blank line after them would dispatch an
empty event in parsers that keep the last event id (the openai SDK's does, and then fails to decode
the empty ``data``); spec-following clients (EventSource) treat both forms the same.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Response

DONE = "[DONE]"
CONTENT_TYPE = "text/event-stream;charset=UTF-8"
HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and similar proxies buffer responses unless told not to; a buffered stream is no stream.
    "X-Accel-Buffering": "no",
}
RETRY_MS = 3000  # how long EventSource waits before it reconnects
# Not line breaks for SSE, but str.splitlines() breaks on them; JSON allows them escaped.
_SPLITLINES_EXTRA = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _single_line(text: str, what: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(f"an SSE {what} may not contain a line break: {text!r}")
    return text


class EncodedJSON(dict):
    """A JSON object that carries its own encoding, made by ``encode_json``: a streamed chunk built from a
    template (service/openai_stream.py) costs the encoding of its text alone, not of the whole object's
    (that was a fifth of the hub's work per streamed token, bench/README.md section 13). Never changed once
    made: the encoding would go stale."""

    __slots__ = ("encoded",)

    def __init__(self, fields: dict[str, Any], encoded: str) -> None:
        super().__init__(fields)
        self.encoded = encoded


def encode_json(payload: Any) -> str:
    """Compact JSON; non-ASCII text stays readable unless it holds a lone surrogate (then escaped)."""
    if type(payload) is EncodedJSON:
        return payload.encoded
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_SPLITLINES_EXTRA)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(payload, ensure_ascii=True, separators=(",", ":"))


def event(data: Any, *, id: int | str | None = None, name: str | None = None) -> bytes:
    """One event. ``data``: a JSON-able object, or a one-line string such as ``DONE``."""
    lines = []
    if name is not None:
        lines.append(f"event: {_single_line(name, 'event name')}")
    if type(id) is int:  # a stream's sequence number (EventIds): nothing in it to check
        lines.append(f"id: {id}")
    elif id is not None:
        id_text = _single_line(str(id), "id")
        if "\0" in id_text:
            raise ValueError("an SSE id may not contain NUL")
        lines.append(f"id: {id_text}")
    text = _single_line(data, "data string") if isinstance(data, str) else encode_json(data)
    lines.append(f"data: {text}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def comment(text: str = "ping") -> bytes:
    """A comment line (no blank line, see above): clients ignore it; it keeps proxies from timing out and
    its write fails once the client has gone."""
    return f": {_single_line(text, 'comment')}\n".encode("utf-8")


def retry(milliseconds: int = RETRY_MS) -> bytes:
    """The reconnection delay for EventSource: once, first, as a single line (see above)."""
    return f"retry: {int(milliseconds)}\n".encode("utf-8")


class EventIds:
    """Numbers a stream's events 1, 2, 3, ... (``id:`` is a per-stream sequence number)."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def event(self, data: Any, *, name: str | None = None) -> bytes:
        self.last += 1
        return event(data, id=self.last, name=name)


def response(frames: Iterable[bytes], *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A streaming Flask response with the event-stream headers. ``frames`` is consumed as it is sent."""
    result = Response(frames if isinstance(frames, Iterator) else iter(frames), status=status,
                      content_type=CONTENT_TYPE)
    result.headers.update(HEADERS)
    if headers:
        result.headers.update(headers)
    return result

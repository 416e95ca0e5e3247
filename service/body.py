"""Request bodies: read within a size and a time bound, and parsed as strict JSON.

Every route that takes a body calls ``json_body()`` (never ``request.get_json()``). Whatever a client
sends, the answer is the parsed value or a 4xx, never a 5xx:

- larger than RIVULET_MAX_BODY_BYTES: 413, never read past the limit;
- not all there within RIVULET_BODY_TIMEOUT_S (a stalled or trickling upload): 408;
- anything the parser refuses: 400 ``invalid_json``. Beyond malformed JSON that is:
  - not UTF-8 (RFC 8259 says JSON text is UTF-8; a leading byte-order mark is allowed and skipped);
  - nested deeper than ``MAX_JSON_DEPTH`` arrays/objects (Python's parser would hit its recursion limit,
    and later stages walk the value recursively too);
  - more than ``MAX_JSON_ITEMS`` array elements and object members: parsing holds the interpreter
    (and with it every other stream of the worker) for its whole length, about 1.5 s for 12 MiB of
    empty arrays; counted in C before parsing, so such a body costs a fraction of that;
  - ``NaN``, ``Infinity``, ``-Infinity`` (Python reads them by default; JSON has no such literals), and
    numbers too large for a double (``1e999`` would become infinity);
  - integers longer than Python converts (``sys.get_int_max_str_digits()``, 4300 digits);
  - a string with an unpaired UTF-16 surrogate escape (``"\\ud800"``): valid JSON syntax, but no Unicode
    text, so it could not be tokenized or sent back as UTF-8. Refused rather than replaced, so the
    model never sees text the client did not write;
  - a key given twice in one object: parsers disagree on which one wins (first, last, error), so a proxy
    in front and this server could read different requests from the same bytes. Refused, naming the key.
"""
from __future__ import annotations

import json
import math
import re
import socket
import sys
from typing import Any

import gevent
from flask import current_app, g, request

from models.errors import BodyTimeout, BodyTooLarge, InvalidJson

# Arrays/objects inside each other. Real requests use 4 or 5 (chat messages with content parts); a
# package's structured STRING input may nest more. Far below the interpreter's recursion limit.
MAX_JSON_DEPTH = 64
# Array elements and object members (commas outside strings, give or take one per container). A prompt
# of token ids as long as a 128k context fits with room; 12 MiB of tiny values does not.
MAX_JSON_ITEMS = 262_144
_READ_CHUNK = 64 * 1024


def json_body() -> Any:
    """The request's JSON, for every route that takes a body."""
    return parse_json(raw_body())


def raw_body() -> bytes:
    """The body's exact bytes, read once per request (a signature check hashes what json_body parses).

    Bodies over RIVULET_MAX_BODY_BYTES get 413 and are never read past the limit: at once when
    Content-Length says so (nothing is read), as soon as one byte past the limit arrives when chunked.
    """
    if "rivulet_body" not in g:
        settings = current_app.extensions["rivulet"].settings
        limit = settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"the request body is {request.content_length} bytes; the limit is {limit} "
                               "(RIVULET_MAX_BODY_BYTES)")
        g.rivulet_body = read_body(limit, settings.body_timeout_s)
    return g.rivulet_body


def read_body(limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes, within ``timeout_s`` seconds from now.

    The time bound is on the whole body, not on each read: a client sending one byte a second never
    lets a read wait long, yet would hold its connection for days. gunicorn bounds the request head
    (its ``keepalive`` setting); this bounds the body, and only the body: the answer, a stream that may
    last minutes, is never under it.
    """
    timeout = gevent.Timeout(timeout_s, BodyTimeout(
        f"the request body did not arrive within {timeout_s:g} s (RIVULET_BODY_TIMEOUT_S)"))
    try:
        with timeout:
            return _read_at_most(limit)
    except BodyTimeout:
        _stop_reading()
        raise


def _stop_reading() -> None:
    """The rest of a late body is not wanted, and where the next request would start is unknown: shut
    the connection's reading side, so gunicorn closes it right after the 408 instead of draining the
    trickle (its own drain is bounded only by ``keepalive``)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:  # already gone: nothing left to stop
        pass


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


def parse_json(data: bytes) -> Any:
    """Strict JSON (see the module's docstring for what is refused). Raises InvalidJson."""
    if not data.strip():
        raise InvalidJson("the request body is empty; send a JSON object")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"the request body is not UTF-8 (byte {exc.start} is not valid); JSON must be "
                          "UTF-8 text") from None
    if _more_items_than(data, MAX_JSON_ITEMS):
        raise InvalidJson(f"the request body holds more than {MAX_JSON_ITEMS:,} array elements and object "
                          "members; send fewer (a prompt of token ids longer than any context is the usual "
                          "cause)")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_int, object_pairs_hook=_object_without_repeated_keys)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # json.JSONDecodeError: where and what
        raise InvalidJson(f"the request body is not valid JSON: {exc}") from None
    if _nested_deeper_than(data, MAX_JSON_DEPTH):
        raise _too_deep()
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise InvalidJson("a string in the request body holds an unpaired UTF-16 surrogate escape "
                          "(\\ud800 to \\udfff without its pair): it is not Unicode text")
    return value


def _too_deep() -> InvalidJson:
    return InvalidJson(f"the request body nests arrays/objects more than {MAX_JSON_DEPTH} levels deep")


def _refuse_constant(name: str) -> Any:
    raise InvalidJson(f"{name} is not a JSON value (JSON numbers are finite); send a number or null")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise InvalidJson(f"the number {_shorten(literal)} in the request body is out of range "
                          "(beyond a double's ±1.8e308)")
    return value


def _int(literal: str) -> int:
    try:
        return int(literal)
    except ValueError:  # more digits than the interpreter converts (a CPU-time guard)
        raise InvalidJson(f"the integer {_shorten(literal)} in the request body has {len(literal)} digits; "
                          f"at most {sys.get_int_max_str_digits()} are accepted") from None


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise InvalidJson(f"the key {repeated!r} appears more than once in one object of the request body",
                          param=repeated)
    return obj


def _shorten(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-8:]}"


# Strings (with their escapes) are skipped when counting brackets; what is left of a valid document is
# a balanced bracket sequence (objects and arrays alike: "{" counts as "["), and removing every
# innermost "[]" pair takes one level off (bytes.replace does not rescan what it produced).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _nested_deeper_than(data: bytes, limit: int) -> bool:
    """Is the (valid) JSON ``data`` nested more than ``limit`` levels? One regex pass, a translation and
    at most ``limit`` replaces, all in C: no Python loop over a body that may be megabytes of brackets
    (12 MiB of small arrays takes ~0.2 s here, json.loads itself ~2.5 s)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the usual case: too few brackets to be that deep
    brackets = _STRING.sub(b"", data).translate(_AS_SQUARE, _NOT_BRACKETS)
    for _ in range(limit):
        brackets = brackets.replace(b"[]", b"")
        if not brackets:
            return False
    return True


def _more_items_than(data: bytes, limit: int) -> bool:
    """Are there more than ``limit`` commas outside the strings of ``data``? In C: a count, and only when
    that finds more than ``limit`` commas at all, a regex pass that drops the strings first (prose with
    many commas is one string)."""
    if data.count(b",") <= limit:
        return False
    return _STRING.sub(b"", data).count(b",") > limit


def _has_lone_surrogate(value: Any) -> bool:
    """Encoding to UTF-8 refuses exactly the unpaired surrogates (a pair was joined by the parser)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False

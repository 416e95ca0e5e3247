"""Request bodies: every body the parser refuses is 400 invalid_json, never a 5xx; size and time bounds."""
from __future__ import annotations

import json

import pytest

from models.errors import BodyTimeout, InvalidJson
from service.body import MAX_JSON_DEPTH, MAX_JSON_ITEMS, parse_json, read_body

CHAT = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3}


@pytest.mark.parametrize("data, value", [
    (json.dumps(CHAT).encode(), CHAT),
    (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),  # a UTF-8 byte-order mark is skipped (PowerShell sends one)
    ('{"t": "日本 \\ud83d\\ude00"}'.encode(), {"t": "日本 😀"}),  # an escaped surrogate *pair* is one character
    (b'{"big": 1e308, "small": -1e-400, "n": ' + b"9" * 4300 + b"}",
     {"big": 1e308, "small": -0.0, "n": int("9" * 4300)}),
    (b'{"s": "[[[[{{{{"}', {"s": "[[[[{{{{"}),  # brackets inside strings are not nesting
    (b'{"s": "\\\\ud800"}', {"s": "\\ud800"}),  # an escaped backslash, then plain letters
])
def test_valid_json_is_parsed(data, value):
    assert parse_json(data) == value


def test_items_up_to_the_limit_are_accepted_more_are_refused_before_parsing():
    prompt = [7] * MAX_JSON_ITEMS  # MAX_JSON_ITEMS - 1 commas, and one more in the object
    assert parse_json(json.dumps({"prompt": prompt, "max_tokens": 3}).encode())["prompt"] == prompt
    with pytest.raises(InvalidJson, match=f"more than {MAX_JSON_ITEMS:,} array elements"):
        parse_json(json.dumps({"prompt": prompt + [7], "max_tokens": 3}).encode())
    # 12 MiB of empty arrays: refused at once (parsing them would hold the worker for over a second).
    with pytest.raises(InvalidJson, match="array elements and object members"):
        parse_json(b"[" + b"[]," * (4 * 1024 * 1024 - 1) + b"[]]")
    # Commas inside strings are text, not items.
    prose = "one, two, " * MAX_JSON_ITEMS
    assert parse_json(json.dumps({"prompt": prose}).encode()) == {"prompt": prose}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_nesting_up_to_the_limit_is_accepted_one_more_level_is_not():
    assert parse_json(b'{"a": ' + nested(MAX_JSON_DEPTH - 1) + b"}")
    with pytest.raises(InvalidJson, match=f"more than {MAX_JSON_DEPTH} levels"):
        parse_json(b'{"a": ' + nested(MAX_JSON_DEPTH) + b"}")
    # Objects and arrays count alike, and brackets inside strings not at all.
    mixed = b'"x"'
    for level in range(MAX_JSON_DEPTH):
        mixed = b'{"a": ' + mixed + b', "b": "]}]"}' if level % 2 else b'["[{", ' + mixed + b"]"
    assert parse_json(mixed)
    with pytest.raises(InvalidJson, match="levels deep"):
        parse_json(b"[" + mixed + b"]")
    # Wide is not deep: thousands of sibling arrays at depth 2.
    assert len(parse_json(b"[" + b",".join([b"[1]"] * 5000) + b"]")) == 5000


@pytest.mark.parametrize("data, message", [
    (b"[" * 100_000 + b"]" * 100_000, "levels deep"),  # deeper than the interpreter's recursion limit
    (b'{"a":' * 100_000, "levels deep"),  # deep and unfinished
    (b"", "empty"),
    (b"  \n", "empty"),
    (b"{not json", "not valid JSON"),
    (b'{"a": 1} trailing', "not valid JSON"),
    (b'{"a": "\xff"}', "not UTF-8"),
    ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
    (b'{"temperature": NaN}', "NaN is not a JSON value"),
    (b'{"temperature": Infinity}', "Infinity is not a JSON value"),
    (b'{"temperature": -Infinity}', "-Infinity is not a JSON value"),
    (b'{"temperature": 1e999}', "out of range"),
    (b'{"temperature": -1.5e400}', "out of range"),
    (b'{"seed": ' + b"9" * 4301 + b"}", "4301 digits"),
    (b'{"t": "a\\ud800b"}', "unpaired UTF-16 surrogate"),
    (b'{"t": ["\\udfff"]}', "unpaired UTF-16 surrogate"),
    (b'{"\\ud83d": 1}', "unpaired UTF-16 surrogate"),  # in a key too
    (b'{"stream": false, "stream": true}', "'stream' appears more than once"),
    (b'{"a": [{"x": 1, "y": 2, "x": 3}]}', "'x' appears more than once"),
])
def test_refused_bodies_are_invalid_json(data, message):
    with pytest.raises(InvalidJson, match=message) as caught:
        parse_json(data)
    assert caught.value.code == "invalid_json" and caught.value.type == "invalid_request_error"


def test_a_repeated_key_is_named_as_the_param():
    with pytest.raises(InvalidJson) as caught:
        parse_json(b'{"model": "a", "model": "b"}')
    assert caught.value.param == "model"


# --- over the app (Flask's test client) ----------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"[" * 100_000, b'{"messages": [], "temperature": NaN}', b'{"a": 1, "a": 2}', b'{"t": "\\udc00"}',
])
def test_every_body_route_answers_400_invalid_json(client, data):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/sse", "/v1/streams"):
        response = client.post(path, data=data, content_type="application/json")
        assert response.status_code == 400, (path, response.get_json())
        assert response.get_json()["error"]["code"] == "invalid_json"


def test_the_size_limit_still_answers_413(make_settings):
    from service import create_app

    client = create_app(make_settings(max_body_bytes=100)).test_client()
    response = client.post("/v1/completions", data=b'{"prompt": "' + b"x" * 200 + b'"}')
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "request_too_large"


def test_a_body_that_does_not_arrive_in_time_is_a_body_timeout(app):
    """The time bound interrupts a read that waits (gevent: the worker's sockets are cooperative)."""
    from gevent import socket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b'{"prompt": ')  # and then nothing more
        stream = ours.makefile("rb")
        environ = {"wsgi.input": stream, "CONTENT_LENGTH": "100"}
        with app.test_request_context(method="POST", environ_overrides=environ):
            with pytest.raises(BodyTimeout, match="RIVULET_BODY_TIMEOUT_S"):
                read_body(1000, timeout_s=0.2)
        stream.close()


def test_a_body_timeout_is_408():
    from service.errors import http_status

    assert http_status(BodyTimeout("slow")) == 408

"""Bodies the JSON parser refuses, over real HTTP: 400 invalid_json, no traceback in the log, and the
server keeps serving (a 100,000-deep body used to be a 500 from a RecursionError)."""
from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest
import requests

CHAT = b'"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'

HOSTILE = [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the interpreter's recursion limit
    b'{"messages": ' + b"[" * 100_000,  # and unfinished
    b"{" + CHAT + b', "temperature": NaN}',  # not JSON
    b"{" + CHAT + b', "temperature": -Infinity}',
    b"{" + CHAT + b', "top_p": 1e999}',  # beyond a double
    b"{" + CHAT + b', "seed": ' + b"7" * 5000 + b"}",  # beyond Python's int conversion limit
    b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 2}',  # a lone surrogate
    b"{" + CHAT + b', "max_tokens": 3}',  # a key given twice
    b"{" + CHAT + b', "x": "\xc3\x28"}',  # not UTF-8
    b"[" + b"[]," * (4 * 1024 * 1024 - 2) + b"[]]",  # 12 MiB of empty arrays: too many items to parse
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/sse"])
@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
def test_refused_bodies_are_400_invalid_json(demo_server, path, body):
    response = requests.post(demo_server.url + path, data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"


def test_a_deep_chunked_body_is_refused_too_and_nothing_was_logged_as_a_crash(demo_server):
    chunks = (b"[" * 1000 for _ in range(100))
    response = requests.post(demo_server.url + "/v1/completions", data=chunks, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert "RecursionError" not in demo_server.log() and "unhandled error" not in demo_server.log()
    assert requests.get(demo_server.url + "/ready", timeout=10).status_code == 200


@pytest.mark.parametrize("head, status, code", [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),  # no method, path and version
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "bad_request"),  # no colon
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
     "request_header_fields_too_large"),
])
def test_requests_gunicorn_itself_refuses_get_a_json_error_too(demo_server, head, status, code):
    """These never reach a route: gunicorn answers them itself (service/gunicorn_errors.py)."""
    url = urlsplit(demo_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head_text, _, body = answer.partition(b"\r\n\r\n")
    assert head_text.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"content-type: application/json" in head_text.lower()
    error = json.loads(body)["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]

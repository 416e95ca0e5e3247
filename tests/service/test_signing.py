"""The SDK-HMAC-SHA256 verifier against requests signed by the vendor's SDK: what it accepts, and a table of
every way a request is refused (each with the code that names the failed check)."""
from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pytest

from service import signing
from service.signing import AuthRejected, WireRequest
from tests.vendor_signer import Signed, vendor_sign

AK, SK = "AKEXAMPLE0001", "sk-0123456789abcdef"
HOST = "rivulet.example:8080"
DATE = "20261202T101500Z"
NOW = datetime(2026, 12, 2, 10, 15, tzinfo=timezone.utc).timestamp()
SKEW = 900
BODY = '{"messages": [{"role": "user", "content": "你是谁?"}], "max_tokens": 8}'.encode()
PATH = "/v1/streams/%E6%B5%81%20a%2Bb/drop-readers"  # "流 a+b": a segment that needs encoding


def to_wire(signed: Signed) -> WireRequest:
    target = urlsplit(signed.target)
    return WireRequest(signed.method, target.path, target.query,
                       {name.lower(): value.encode("latin-1") for name, value in signed.headers.items()})


def check(wire: WireRequest, body: bytes, *, secret: str = SK, now: float = NOW) -> None:
    auth = signing.parse_authorization(wire.headers["authorization"].decode("latin-1"))
    signing.verify(wire, auth, secret, body=lambda: body, now=now, max_skew_s=SKEW)


def good(**overrides) -> Signed:
    arguments = dict(host=HOST, body=BODY, query=[("kind", "chat"), ("note", "中 文&=")], date=DATE,
                     headers={"X-Client": "测试 client"})
    arguments.update(overrides)
    return vendor_sign(AK, SK, "POST", PATH, **arguments)


def with_header(wire: WireRequest, name: str, value: bytes | None) -> WireRequest:
    headers = dict(wire.headers)
    if value is None:
        headers.pop(name, None)
    else:
        headers[name] = value
    return dataclasses.replace(wire, headers=headers)


def test_the_vendor_signature_is_accepted():
    signed = good()
    check(to_wire(signed), signed.body)


@pytest.mark.parametrize("offset", [-SKEW, SKEW])
def test_a_date_at_the_edge_of_the_skew_is_accepted(offset):
    signed = good()
    check(to_wire(signed), signed.body, now=NOW - offset)


def test_a_bodyless_get_with_unsigned_payload_is_accepted():
    # The SDK marks a non-JSON request UNSIGNED-PAYLOAD, but an empty body is hashed as empty all the same.
    signed = vendor_sign(AK, SK, "GET", "/v1/models", host=HOST, date=DATE, headers={"Content-Type": "text/plain"})
    assert signed.headers["X-Sdk-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    check(to_wire(signed), b"")


def test_a_signed_content_hash_that_matches_the_body_is_accepted():
    signed = good(headers={"X-Sdk-Content-Sha256": hashlib.sha256(BODY).hexdigest()})
    check(to_wire(signed), BODY)


def test_the_canonical_uri_and_query_match_the_sdks_encoding():
    assert signing.canonical_uri("/v1/sse") == "/v1/sse/"
    assert signing.canonical_uri("/") == "/"
    assert signing.canonical_uri("/a%20b/c d/~x/%7e") == "/a%20b/c%20d/~x/~/"
    assert signing.canonical_query("b=2&a=%E4%B8%AD&a=1&flag") == "a=1&a=%E4%B8%AD&b=2&flag="
    assert signing.canonical_query("q=a+b") == "q=a%20b"


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1:]


def _replace_auth(wire: WireRequest, old: str, new: str) -> WireRequest:
    value = wire.headers["authorization"].decode("latin-1").replace(old, new)
    return with_header(wire, "authorization", value.encode("latin-1"))


def _signature_flipped(wire: WireRequest) -> WireRequest:
    value = wire.headers["authorization"].decode()
    last = value[-1]
    return with_header(wire, "authorization", (value[:-1] + ("0" if last != "0" else "1")).encode())


# (case, how to break a good request and its body, the code expected)
REJECTIONS = [
    ("one body byte", lambda w, b: (w, _flip(b, 5)), "signature_mismatch"),
    ("a byte of the Chinese prompt", lambda w, b: (w, b.replace("你".encode(), "您".encode())), "signature_mismatch"),
    ("one more body byte", lambda w, b: (w, b + b" "), "signature_mismatch"),
    ("an empty body", lambda w, b: (w, b""), "signature_mismatch"),
    ("a signed header's value", lambda w, b: (with_header(w, "x-client", "测试 clienT".encode()), b),
     "signature_mismatch"),
    ("the Content-Type", lambda w, b: (with_header(w, "content-type", b"application/jsoN"), b), "signature_mismatch"),
    ("the Host", lambda w, b: (with_header(w, "host", b"rivulet.example:8081"), b), "signature_mismatch"),
    ("the date by a second", lambda w, b: (with_header(w, "x-sdk-date", b"20261202T101501Z"), b),
     "signature_mismatch"),
    ("one path byte", lambda w, b: (dataclasses.replace(w, raw_path=w.raw_path.replace("%2B", "%2C")), b),
     "signature_mismatch"),
    ("the path's case", lambda w, b: (dataclasses.replace(w, raw_path=w.raw_path.replace("drop", "Drop")), b),
     "signature_mismatch"),
    ("a query value", lambda w, b: (dataclasses.replace(w, raw_query=w.raw_query.replace("chat", "chaT")), b),
     "signature_mismatch"),
    ("an added query parameter", lambda w, b: (dataclasses.replace(w, raw_query=w.raw_query + "&x=1"), b),
     "signature_mismatch"),
    ("the method", lambda w, b: (dataclasses.replace(w, method="PUT"), b), "signature_mismatch"),
    ("the signature", lambda w, b: (_signature_flipped(w), b), "signature_mismatch"),
    ("a stale date", lambda w, b: (w, b, NOW + SKEW + 1), "stale_date"),
    ("a date in the future", lambda w, b: (w, b, NOW - SKEW - 1), "stale_date"),
    ("no X-Sdk-Date", lambda w, b: (with_header(w, "x-sdk-date", None), b), "missing_date"),
    ("a malformed X-Sdk-Date", lambda w, b: (with_header(w, "x-sdk-date", b"2026-12-02T10:15:00Z"), b),
     "invalid_date"),
    ("host not signed", lambda w, b: (_replace_auth(w, "host;", ""), b), "unsigned_required_header"),
    ("x-sdk-date not signed", lambda w, b: (_replace_auth(w, ";x-sdk-date", ""), b), "unsigned_required_header"),
    ("a signed header missing", lambda w, b: (with_header(w, "x-client", None), b), "missing_signed_header"),
    ("an unsigned content hash", lambda w, b: (with_header(w, "x-sdk-content-sha256", b"UNSIGNED-PAYLOAD"), b),
     "unsigned_required_header"),
    ("another algorithm", lambda w, b: (_replace_auth(w, "SDK-HMAC-SHA256", "SDK-HMAC-SM3"), b),
     "unsupported_signature_algorithm"),
    ("no Signature", lambda w, b: (_replace_auth(w, ", Signature=", ", Sig="), b), "malformed_authorization"),
    ("an unknown field", lambda w, b: (_replace_auth(w, "Access=", "Key="), b), "malformed_authorization"),
    ("a short signature", lambda w, b: (with_header(w, "authorization", w.headers["authorization"][:-2]), b),
     "malformed_authorization"),
]


@pytest.mark.parametrize("mutate, code", [(m, c) for _, m, c in REJECTIONS], ids=[case for case, _, _ in REJECTIONS])
def test_rejections(mutate, code):
    signed = good()
    wire, body, *now = mutate(to_wire(signed), signed.body)
    check(to_wire(signed), signed.body)  # the unbroken request passes: the mutation alone is refused
    with pytest.raises(AuthRejected) as raised:
        check(wire, body, now=now[0] if now else NOW)
    assert raised.value.code == code
    assert SK not in raised.value.message and signed.headers["Authorization"][-64:] not in raised.value.message


def test_the_wrong_secret_is_a_mismatch():
    signed = good()
    with pytest.raises(AuthRejected) as raised:
        check(to_wire(signed), signed.body, secret=SK + "x")
    assert raised.value.code == "signature_mismatch"


def test_unsigned_payload_with_a_body_is_refused():
    signed = good(headers={"Content-Type": "text/plain"})  # the SDK sends UNSIGNED-PAYLOAD for it
    assert signed.headers["X-Sdk-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    with pytest.raises(AuthRejected) as raised:
        check(to_wire(signed), signed.body)
    assert raised.value.code == "unsigned_payload_refused"


def test_a_signed_content_hash_of_another_body_is_refused():
    signed = good(headers={"X-Sdk-Content-Sha256": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(AuthRejected) as raised:
        check(to_wire(signed), BODY)
    assert raised.value.code == "content_hash_mismatch"


def test_the_body_is_not_read_when_a_cheap_check_fails():
    signed = good()
    wire = with_header(to_wire(signed), "x-sdk-date", None)
    auth = signing.parse_authorization(signed.headers["Authorization"])

    def body() -> bytes:
        raise AssertionError("the body was read")

    with pytest.raises(AuthRejected):
        signing.verify(wire, auth, SK, body=body, now=NOW, max_skew_s=SKEW)

"""The one verifier of ``SDK-HMAC-SHA256`` signed requests (Huawei Cloud API Gateway's scheme, as its SDKs
sign): AK/SK requests and app-signed requests use it alike; only where the secret comes from differs.

The client sends ``X-Sdk-Date: YYYYMMDDTHHMMSSZ`` and
``Authorization: SDK-HMAC-SHA256 Access=<key id>, SignedHeaders=<h1;h2;...>, Signature=<hex>``, where

    canonical request = METHOD \\n canonical URI \\n canonical query \\n canonical headers \\n
                        signed header list \\n hex SHA-256 of the body
    string to sign    = SDK-HMAC-SHA256 \\n <X-Sdk-Date> \\n hex SHA-256 of the canonical request
    signature         = hex HMAC-SHA256(secret, string to sign)

Everything here works on what arrived on the wire: the raw path and query, header values as their bytes,
the body's exact bytes. Nothing here knows Flask; ``service/auth.py`` adapts a request. Each failed check
raises ``AuthRejected`` with a code naming it; no message ever contains a secret or a signature.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import parse_qsl, quote, unquote

from models.errors import Unauthorized

ALGORITHM = "SDK-HMAC-SHA256"
DATE_HEADER = "x-sdk-date"
CONTENT_HASH_HEADER = "x-sdk-content-sha256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
# The gateway's rule: a signature must cover where the request was sent and when it was made.
REQUIRED_SIGNED_HEADERS = ("host", DATE_HEADER)
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # an HTTP token, lower case
_AUTH_FIELDS = ("Access", "SignedHeaders", "Signature")


class AuthRejected(Unauthorized):
    """A credential was refused. ``code`` (the client's ``error.code``) names the check that failed;
    ``method`` and ``key_id``, once set, are those of the configured key the request named (safe to log)."""

    method: str | None = None
    key_id: str | None = None

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SignedAuthorization:
    """The parts of an ``Authorization: SDK-HMAC-SHA256 ...`` header."""

    access: str
    signed_headers: tuple[str, ...]
    signature: str


@dataclass(frozen=True)
class WireRequest:
    """A request as it arrived: ``raw_path`` and ``raw_query`` still percent-encoded, ``headers`` keyed by
    lower-case name with their values' bytes (a WSGI server hands header values over as latin-1 text)."""

    method: str
    raw_path: str
    raw_query: str
    headers: Mapping[str, bytes]


def is_signed(authorization: str) -> bool:
    """Does this Authorization value claim to be an SDK-HMAC signature (of any algorithm)?"""
    return authorization.strip().upper().startswith("SDK-HMAC-")


def parse_authorization(value: str) -> SignedAuthorization:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise AuthRejected("unsupported_signature_algorithm",
                           f"the signature algorithm {algorithm[:32]!r} is not supported; sign with {ALGORITHM}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, equals, field_value = part.strip().partition("=")
        if not equals or name not in _AUTH_FIELDS or name in fields:
            raise AuthRejected("malformed_authorization",
                               f"the Authorization header must be '{ALGORITHM} Access=<key>, "
                               "SignedHeaders=<h1;h2>, Signature=<hex>'")
        fields[name] = field_value.strip()
    missing = [name for name in _AUTH_FIELDS if not fields.get(name)]
    if missing:
        raise AuthRejected("malformed_authorization", f"the Authorization header lacks {', '.join(missing)}")
    signed_headers = tuple(fields["SignedHeaders"].split(";"))
    if not all(_HEADER_NAME.fullmatch(name) for name in signed_headers):
        raise AuthRejected("malformed_authorization",
                           "SignedHeaders must be lower-case header names separated by ';'")
    if not _HEX_SHA256.fullmatch(fields["Signature"]):
        raise AuthRejected("malformed_authorization", "Signature must be 64 lower-case hex digits")
    return SignedAuthorization(fields["Access"], signed_headers, fields["Signature"])


def canonical_uri(raw_path: str) -> str:
    """Each path segment decoded then encoded again (RFC 3986 unreserved characters kept), always ending
    in '/': the client and the server agree however either of them escaped the path."""
    path = "/".join(quote(segment, safe="~") for segment in unquote(raw_path).split("/"))
    return path if path.endswith("/") else path + "/"


def canonical_query(raw_query: str) -> str:
    """Every ``name=value`` decoded, sorted by name then value, and encoded again."""
    pairs = sorted(parse_qsl(raw_query, keep_blank_values=True))
    return "&".join(f"{quote(name, safe='~')}={quote(value, safe='~')}" for name, value in pairs)


def canonical_request(request: WireRequest, signed_headers: tuple[str, ...], payload_hash: str) -> bytes:
    headers = b"".join(name.encode("ascii") + b":" + request.headers[name].strip() + b"\n"
                       for name in signed_headers)
    return b"\n".join((
        request.method.upper().encode("ascii"),
        canonical_uri(request.raw_path).encode("ascii"),
        canonical_query(request.raw_query).encode("ascii"),
        headers,
        ";".join(signed_headers).encode("ascii"),
        payload_hash.encode("ascii"),
    ))


def string_to_sign(canonical: bytes, sdk_date: str) -> bytes:
    return f"{ALGORITHM}\n{sdk_date}\n{hashlib.sha256(canonical).hexdigest()}".encode("ascii")


def signature(secret: str, to_sign: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), to_sign, hashlib.sha256).hexdigest()


def verify(request: WireRequest, auth: SignedAuthorization, secret: str, *, body: Callable[[], bytes],
           now: float, max_skew_s: float) -> None:
    """Check a parsed signature against ``secret``; raise ``AuthRejected`` naming the first failed check.

    The cheap checks (date, signed headers) come first: ``body`` (which reads the request body, and may
    raise 413) is called only when the signature could be right apart from the body.
    """
    sdk_date = _checked_date(request, now, max_skew_s)
    _check_signed_headers(request, auth.signed_headers)
    payload_hash = _payload_hash(request, body())
    expected = signature(secret, string_to_sign(canonical_request(request, auth.signed_headers, payload_hash),
                                                sdk_date))
    if not hmac.compare_digest(expected, auth.signature):
        raise AuthRejected("signature_mismatch",
                           "the signature does not match the request (its method, path, query, signed "
                           "headers, body or X-Sdk-Date differ from what was signed, or the secret is wrong)")


def _checked_date(request: WireRequest, now: float, max_skew_s: float) -> str:
    raw = request.headers.get(DATE_HEADER)
    if raw is None:
        raise AuthRejected("missing_date", "a signed request needs an X-Sdk-Date header (YYYYMMDDTHHMMSSZ, UTC)")
    sdk_date = raw.strip().decode("latin-1")
    try:
        signed_at = datetime.strptime(sdk_date, DATE_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise AuthRejected("invalid_date", "X-Sdk-Date must be YYYYMMDDTHHMMSSZ (UTC)") from None
    skew = signed_at - now
    if abs(skew) > max_skew_s:
        when = "ahead of" if skew > 0 else "behind"
        raise AuthRejected("stale_date",
                           f"X-Sdk-Date is {abs(skew):.0f} s {when} the server's clock; at most {max_skew_s:g} s "
                           "is allowed (RIVULET_SIGNATURE_MAX_SKEW_S): sign again, or fix the client's clock")
    return sdk_date


def _check_signed_headers(request: WireRequest, signed_headers: tuple[str, ...]) -> None:
    required = list(REQUIRED_SIGNED_HEADERS)
    if CONTENT_HASH_HEADER in request.headers:  # it replaces the body hash, so it must be signed itself
        required.append(CONTENT_HASH_HEADER)
    unsigned = [name for name in required if name not in signed_headers]
    if unsigned:
        raise AuthRejected("unsigned_required_header", f"SignedHeaders must include {', '.join(unsigned)}")
    absent = [name for name in signed_headers if name not in request.headers]
    if absent:
        raise AuthRejected("missing_signed_header",
                           f"headers named in SignedHeaders are not in the request: {', '.join(absent)}")


def _payload_hash(request: WireRequest, body: bytes) -> str:
    if not body:
        return EMPTY_BODY_SHA256  # as the SDKs do, whatever X-Sdk-Content-Sha256 says
    actual = hashlib.sha256(body).hexdigest()
    declared = request.headers.get(CONTENT_HASH_HEADER)
    if declared is None:
        return actual
    declared = declared.strip()
    if declared == UNSIGNED_PAYLOAD.encode("ascii"):
        raise AuthRejected("unsigned_payload_refused",
                           "X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD is refused: the signature must cover the "
                           "body. Send the body as Content-Type: application/json (the SDKs then hash it)")
    if not hmac.compare_digest(declared.lower(), actual.encode("ascii")):
        raise AuthRejected("content_hash_mismatch", "X-Sdk-Content-Sha256 is not the SHA-256 of the body received")
    return declared.decode("ascii")  # as the client signed it (hex digits, whatever their case)

"""Authentication: one layer, four methods, any configured one may authenticate a request.

- token: ``X-Auth-Token: T`` or ``Authorization: Bearer T``, T in RIVULET_API_KEYS;
- AK/SK: ``Authorization: SDK-HMAC-SHA256 Access=AK, ...`` signed with an SK of RIVULET_ACCESS_KEYS;
- app signing: the same signature with an AppKey/AppSecret pair of RIVULET_APP_KEYS;
- app code: ``X-Apig-AppCode: C``, C in RIVULET_APP_CODES.

The credential a request presents picks the method (a signature first, then a token, then an app code;
a credential of a method not configured here is passed over when another is presented, e.g. the openai
SDK's placeholder Bearer key beside an app code); its failure is a 401 whose ``error.code`` says which
check failed. With no method configured nothing is
checked. Every route needs a credential except those marked ``@public`` (health, readiness, metrics, and
capability URLs such as a resumable stream's GET, whose unguessable id is the credential) and CORS
preflights. Tokens and codes are compared in constant time against every configured one, so the time
taken says nothing about how close a guess was. The request log and ``rivulet_auth_requests_total`` get the
method and a key id: the AK or AppKey, or a token's / code's position in its list (``token:2``), never a
secret, a signature, or an id nobody configured.
"""
from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from flask import Flask, Request, current_app, request

from service import signing
from service.http import raw_body
from service.key_files import KeyFile
from service.metrics import Metrics
from service.request_log import current_record
from service.settings import Settings
from service.signing import AuthRejected

View = TypeVar("View", bound=Callable)
_PUBLIC_ATTR = "rivulet_public"

TOKEN, ACCESS_KEY, APP_SIGNATURE, APP_CODE = "token", "aksk", "app_signature", "app_code"
SIGNATURE = "signature"  # a signed request whose key is not known yet: AK/SK or app signing
APP_CODE_HEADER = "X-Apig-AppCode"


def public(view: View) -> View:
    """Mark a view as reachable without credentials."""
    setattr(view, _PUBLIC_ATTR, True)
    return view


def is_public(view: Callable) -> bool:
    return bool(getattr(view, _PUBLIC_ATTR, False))


@dataclass(frozen=True)
class Identity:
    """Who made a request: the method and a key id that is safe to log."""

    method: str
    key_id: str



def presented_token(headers) -> str | None:
    token = headers.get("X-Auth-Token")
    if token:
        return token.strip()
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def matching_index(presented: str, accepted: Sequence[str]) -> int | None:
    """The position of ``presented`` in ``accepted`` (constant time: every entry is compared), or None."""
    presented_bytes = presented.encode("utf-8")
    found = None
    for index, candidate in enumerate(accepted):  # no early exit
        if hmac.compare_digest(presented_bytes, candidate.encode("utf-8")):
            found = index
    return found


class Authenticator:
    """The configured methods. ``authenticate`` returns the identity or raises ``AuthRejected``."""

    def __init__(self, *, tokens: Sequence[str] = (), app_codes: Sequence[str] = (),
                 access_keys: KeyFile | None = None, app_keys: KeyFile | None = None,
                 max_skew_s: float = 900.0, clock: Callable[[], float] = time.time) -> None:
        self.tokens = tuple(tokens)
        self.app_codes = tuple(app_codes)
        self.access_keys = access_keys
        self.app_keys = app_keys
        self.max_skew_s = max_skew_s
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        def key_file(path, field: str) -> KeyFile | None:
            return None if path is None else KeyFile(path, Settings.env_name(field))

        return cls(tokens=settings.api_keys, app_codes=settings.app_codes,
                   access_keys=key_file(settings.access_keys, "access_keys"),
                   app_keys=key_file(settings.app_keys, "app_keys"),
                   max_skew_s=settings.signature_max_skew_s)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.app_codes or self.access_keys or self.app_keys)

    def presented_method(self, req: Request) -> str | None:
        """The method that decides: the first credential presented (signature, token, app code) of a
        configured method, else the first presented at all (which then fails as disabled), else None."""
        presented = []
        if signing.is_signed(req.headers.get("Authorization", "")):
            presented.append(SIGNATURE)
        if presented_token(req.headers) is not None:
            presented.append(TOKEN)
        if req.headers.get(APP_CODE_HEADER, "").strip():
            presented.append(APP_CODE)
        configured = [method for method in presented if self._configured(method)]
        return (configured or presented or [None])[0]

    def _configured(self, method: str) -> bool:
        if method == SIGNATURE:
            return self.access_keys is not None or self.app_keys is not None
        return bool(self.tokens if method == TOKEN else self.app_codes)

    def authenticate(self, req: Request) -> Identity:
        method = self.presented_method(req)
        if method is None:
            raise AuthRejected("missing_credentials", f"credentials are required: {self._accepted()}")
        if not self._configured(method):
            settings = {SIGNATURE: "RIVULET_ACCESS_KEYS and RIVULET_APP_KEYS are", TOKEN: "RIVULET_API_KEYS is",
                        APP_CODE: "RIVULET_APP_CODES is"}[method]
            raise AuthRejected("auth_method_disabled",
                               f"{method} authentication is not enabled here ({settings} unset): {self._accepted()}")
        if method == TOKEN:
            return self._by_index(TOKEN, presented_token(req.headers), self.tokens, "invalid_api_key",
                                  "the API key is not valid")
        if method == APP_CODE:
            return self._by_index(APP_CODE, req.headers[APP_CODE_HEADER].strip(), self.app_codes,
                                  "invalid_app_code", f"the {APP_CODE_HEADER} is not valid")
        return self._by_signature(req)

    @staticmethod
    def _by_index(method: str, presented: str, accepted: tuple[str, ...], code: str, message: str) -> Identity:
        index = matching_index(presented, accepted)
        if index is None:
            raise AuthRejected(code, message)
        return Identity(method, f"{method}:{index + 1}")

    def _by_signature(self, req: Request) -> Identity:
        auth = signing.parse_authorization(req.headers["Authorization"])
        identity, secret = self._secret(auth.access)
        try:
            signing.verify(wire_request(req), auth, secret, body=raw_body, now=self.clock(),
                           max_skew_s=self.max_skew_s)
        except AuthRejected as rejected:
            rejected.method, rejected.key_id = identity.method, identity.key_id
            raise
        return identity

    def _secret(self, key_id: str) -> tuple[Identity, str]:
        """An AK is looked up in RIVULET_ACCESS_KEYS first, then RIVULET_APP_KEYS."""
        for method, key_file in ((ACCESS_KEY, self.access_keys), (APP_SIGNATURE, self.app_keys)):
            secret = None if key_file is None else key_file.keys().get(key_id)
            if secret is not None:
                return Identity(method, key_id), secret
        raise AuthRejected("unknown_access_key", "the key in Access= is not known here (neither an AK of "
                           "RIVULET_ACCESS_KEYS nor an AppKey of RIVULET_APP_KEYS)")

    def _accepted(self) -> str:
        ways = []
        if self.tokens:
            ways.append("'Authorization: Bearer <key>' or 'X-Auth-Token: <key>'")
        if self.access_keys or self.app_keys:
            ways.append(f"a request signed {signing.ALGORITHM} (Authorization and X-Sdk-Date)")
        if self.app_codes:
            ways.append(f"'{APP_CODE_HEADER}: <code>'")
        return "send " + ", or ".join(ways)


def wire_request(req: Request) -> signing.WireRequest:
    """What the client signed: the path and query as sent, header values as their bytes."""
    environ = req.environ
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw_uri:
        raw_path = raw_uri.partition("?")[0]
        if not raw_path.startswith("/"):  # absolute form (a request through a forward proxy)
            raw_path = "/" + raw_path.partition("://")[2].partition("/")[2]
    else:
        raw_path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return signing.WireRequest(
        method=req.method,
        raw_path=raw_path,  # gunicorn refuses a request line that is not ASCII: these are percent-encoded
        raw_query=environ.get("QUERY_STRING", ""),
        headers={name.lower(): _wire_bytes(value) for name, value in req.headers.items()},
    )


def _wire_bytes(text: str) -> bytes:
    try:
        return text.encode("latin-1")  # WSGI's text for the bytes that arrived
    except UnicodeEncodeError:  # a test client handing over real text
        return text.encode("utf-8")


def init_app(app: Flask, settings: Settings, metrics: Metrics) -> None:
    authenticator = Authenticator.from_settings(settings)  # a bad key file stops start-up here
    if not authenticator.enabled:
        return
    app.extensions["rivulet_auth"] = authenticator

    @app.before_request
    def _authenticate() -> None:
        if request.method == "OPTIONS":  # CORS preflights carry no credentials by design
            return
        view = current_app.view_functions.get(request.endpoint or "")
        if view is not None and is_public(view):
            return
        record = current_record()
        try:
            identity = authenticator.authenticate(request)
        except AuthRejected as rejected:
            method = rejected.method or authenticator.presented_method(request) or "none"
            record.note_auth(method, rejected.key_id, rejected.code)
            metrics.auth_requests.labels(method=method, outcome=rejected.code).inc()
            raise
        record.note_auth(identity.method, identity.key_id, "ok")
        metrics.auth_requests.labels(method=identity.method, outcome="ok").inc()

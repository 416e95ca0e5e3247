"""API-key authentication: ``X-Auth-Token: T`` or ``Authorization: Bearer T``, when RIVULET_API_KEYS is set.

Every route needs a key except those marked ``@public`` (health, readiness, metrics, and capability
URLs such as a resumable stream's GET, whose unguessable id is the credential) and CORS preflights.
Keys are compared in constant time, against every configured key, so the time taken says nothing
about how much of a guess was right. Presented tokens are never logged or echoed.
"""
from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import TypeVar

from flask import Flask, current_app, request

from models.errors import Unauthorized

View = TypeVar("View", bound=Callable)
_PUBLIC_ATTR = "rivulet_public"


def public(view: View) -> View:
    """Mark a view as reachable without an API key."""
    setattr(view, _PUBLIC_ATTR, True)
    return view


def is_public(view: Callable) -> bool:
    return bool(getattr(view, _PUBLIC_ATTR, False))


def presented_token(headers) -> str | None:
    token = headers.get("X-Auth-Token")
    if token:
        return token.strip()
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def token_matches(token: str, keys: Sequence[str]) -> bool:
    presented = token.encode("utf-8")
    matched = False
    for key in keys:  # no early exit: every key is compared
        matched |= hmac.compare_digest(presented, key.encode("utf-8"))
    return matched


def init_app(app: Flask, keys: Sequence[str]) -> None:
    if not keys:
        return
    keys = tuple(keys)

    @app.before_request
    def _require_key() -> None:
        if request.method == "OPTIONS":  # CORS preflights carry no credentials by design
            return
        view = current_app.view_functions.get(request.endpoint or "")
        if view is not None and is_public(view):
            return
        token = presented_token(request.headers)
        if token is None:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-Auth-Token: <key>'")
        if not token_matches(token, keys):
            raise Unauthorized("the API key is not valid")

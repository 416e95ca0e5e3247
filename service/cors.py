"""CORS for pages served from other origins (RIVULET_CORS_ORIGINS), through flask-cors.

Unset, no CORS header is ever sent and browsers keep other origins out. Set, the listed origins (exact
``scheme://host[:port]`` strings; ``*`` for any) may call every route: preflights are answered for the
headers our clients send, including ``Last-Event-ID`` (an ``EventSource`` reconnect carries it) and the
headers of every authentication method. Credentials (cookies) are not allowed: keys travel in headers,
never in cookies. Preflights need no credentials (service/auth.py lets OPTIONS through).
"""
from __future__ import annotations

from collections.abc import Sequence

from flask import Flask
from flask_cors import CORS

ALLOWED_HEADERS = ("Content-Type", "Authorization", "X-Auth-Token", "Last-Event-ID", "X-Request-Id",
                   # signed requests and app authentication (service/auth.py)
                   "X-Sdk-Date", "X-Sdk-Content-Sha256", "X-Apig-AppCode")
# What a page's script may read from an answer: the new stream's URL, when to retry after a 429, the id
# to quote in a bug report.
EXPOSED_HEADERS = ("Location", "Retry-After", "X-Request-Id")
ALLOWED_METHODS = ("GET", "POST", "DELETE", "OPTIONS")
PREFLIGHT_MAX_AGE_S = 600  # browsers cache a preflight this long


def init_app(app: Flask, origins: Sequence[str]) -> None:
    if not origins:
        return
    CORS(
        app,
        origins=list(origins),
        methods=list(ALLOWED_METHODS),
        allow_headers=list(ALLOWED_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        supports_credentials=False,
        max_age=PREFLIGHT_MAX_AGE_S,
    )

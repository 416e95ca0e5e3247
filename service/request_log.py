"""One structured log line and one ``rivulet_requests_total`` count per request, plus ``X-Request-Id``.

The line is written when the response is closed: for a stream that is after its last event (or after
the client hung up), so it can carry token counts, time to first token and the finish reason.
Nothing from the request's headers is logged (API keys never reach the log); which authentication method
and which key id made the request is (service/auth.py chooses ids that are safe to log).
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from service.metrics import Metrics

log = logging.getLogger("rivulet.request")

REQUEST_ID_HEADER = "X-Request-Id"
# A caller's own id is kept (to correlate logs across services) when it is short and harmless.
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
UNMATCHED = "unmatched"  # the route label of a path no route has (its metric label stays bounded)
MAX_LOGGED_PATH = 200  # characters of an unmatched path kept in its log line


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class RequestRecord:
    request_id: str
    method: str
    route: str
    path: str | None = None  # only for an unmatched route: the path that was asked for
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token_s: float | None = None
    finish_reason: str | None = None
    # Who made the request (service/auth.py): the method, a key id that is safe to log, and "ok" or the
    # code of the check that failed. None on public routes and when authentication is off.
    auth_method: str | None = None
    key_id: str | None = None
    auth_outcome: str | None = None
    _closed: bool = False

    def note_auth(self, method: str, key_id: str | None, outcome: str) -> None:
        self.auth_method, self.key_id, self.auth_outcome = method, key_id, outcome

    def close(self, metrics: Metrics) -> None:
        if self._closed:
            return
        self._closed = True
        metrics.requests.labels(route=self.route, status=str(self.status)).inc()
        log.info(json.dumps({
            "event": "request",
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            **({"path": self.path} if self.path is not None else {}),
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token_s": _round(self.time_to_first_token_s),
            "duration_s": _round(time.monotonic() - self.started),
            "finish_reason": self.finish_reason,
            "auth_method": self.auth_method,
            "key_id": self.key_id,
            "auth_outcome": self.auth_outcome,
        }, separators=(",", ":")))


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def route_of_request() -> tuple[str, str | None]:
    """(route label, path to log): the rule, not the path, so that a label per URL cannot grow without
    bound (and a resumable stream's id, its credential, stays out of the log). A 405 is a path that has
    a route, for other methods: its route is named too. Only a path no route has is logged as asked."""
    if request.url_rule is not None:
        return request.url_rule.rule, None
    if isinstance(request.routing_exception, MethodNotAllowed):
        adapter = current_app.create_url_adapter(request)
        methods = request.routing_exception.valid_methods or ()
        for method in methods:
            try:
                rule, _ = adapter.match(method=method, return_rule=True)
            except HTTPException:  # not this method's either (or a redirect): try the next
                continue
            return rule.rule, None
    return UNMATCHED, request.path[:MAX_LOGGED_PATH]


def current_record() -> RequestRecord:
    return g.rivulet_record


def init_app(app: Flask, metrics: Metrics) -> None:
    """Register first, so that every other hook (auth, limits) already has a request id to log."""

    @app.before_request
    def _open_record() -> None:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = offered if _ACCEPTED_ID.fullmatch(offered) else new_request_id()
        route, path = route_of_request()
        g.rivulet_record = RequestRecord(request_id, request.method, route, path)

    @app.after_request
    def _close_record_with_response(response: Response) -> Response:
        record: RequestRecord | None = g.get("rivulet_record")
        if record is None:  # a failure before our first hook ran
            return response
        record.status = response.status_code
        response.headers[REQUEST_ID_HEADER] = record.request_id
        # Runs after the body was sent (or the client left): a stream's generator has finished by then.
        response.call_on_close(lambda: record.close(metrics))
        return response

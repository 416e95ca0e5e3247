"""The one mapping of errors to HTTP: statuses, headers, and the shapes of JSON bodies and stream events."""
from __future__ import annotations

import pytest

from models.errors import (
    BodyTooLarge, CapacityError, CheckpointError, ClientGone, ContextLengthExceeded, EngineUnavailable, InvalidRequest, ModelError, NotFound,
    QueueFull, RequestTimeout, RivuletError, Shutdown, Unauthorized,
)
from service.errors import error_response, http_status, stream_error_payload


@pytest.mark.parametrize("error, status", [
    (InvalidRequest("x"), 400), (ContextLengthExceeded("x"), 400), (Unauthorized("x"), 401), (NotFound("x"), 404),
    (BodyTooLarge("x"), 413), (QueueFull("x"), 429), (EngineUnavailable("x"), 503), (Shutdown("x"), 503),
    (RequestTimeout("x"), 504), (ModelError("x"), 500), (CheckpointError("x"), 500), (RivuletError("x"), 500),
    (ClientGone("x"), 499), (CapacityError("x"), 500),
])
def test_status_of_each_error(error, status):
    assert http_status(error) == status


def test_json_body_has_message_type_code_param(app):
    with app.test_request_context():
        response = error_response(ContextLengthExceeded("too long", param="max_tokens"))
    assert response.status_code == 400
    assert response.get_json() == {"error": {"message": "too long", "type": "invalid_request_error",
                                             "code": "context_length_exceeded", "param": "max_tokens"}}


def test_queue_full_says_when_to_retry(app):
    with app.test_request_context():
        response = error_response(QueueFull("full", retry_after_s=3))
    assert response.status_code == 429 and response.headers["Retry-After"] == "3"


def test_unauthorized_names_the_scheme(app):
    with app.test_request_context():
        assert error_response(Unauthorized("no")).headers["WWW-Authenticate"].startswith("Bearer")


def test_stream_error_event_shapes():
    assert stream_error_payload(RequestTimeout("late")) == {
        "error": {"message": "late", "type": "timeout", "code": "request_timeout"}}
    assert stream_error_payload(Shutdown("bye"))["error"]["type"] == "shutdown"
    assert stream_error_payload(KeyError("k"))["error"]["type"] == "model_error"
    assert stream_error_payload(None)["error"]["code"] == "model_error"

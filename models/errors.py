"""The one error hierarchy of Rivulet.

Every failure a client can see is one of these. The web side maps them in exactly two places:
to an HTTP status + JSON body before a stream starts (``service/errors.py``), and to an SSE error
event after it started. Nothing here knows about HTTP.
"""
from __future__ import annotations

from models.api import SHUTDOWN, TIMEOUT

TIMEOUT_MESSAGE = "the request ran past its time limit (RIVULET_REQUEST_TIMEOUT_S)"


class RivuletError(Exception):
    """Base class. ``type`` and ``code`` go to the client as ``error.type`` / ``error.code``."""

    type = "internal_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(RivuletError):
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidJson(InvalidRequest):
    """The body is not JSON this server takes: malformed, not UTF-8, nested too deep, NaN or Infinity,
    a lone surrogate, or a key given twice in one object."""

    code = "invalid_json"


class Unauthorized(RivuletError):
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(RivuletError):
    type = "not_found_error"
    code = "not_found"


class BodyTooLarge(RivuletError):
    type = "invalid_request_error"
    code = "request_too_large"


class BodyTimeout(RivuletError):
    """The request body did not arrive in time (a client sending it too slowly, or stalled)."""

    type = "invalid_request_error"
    code = "request_body_timeout"


class QueueFull(RivuletError):
    """The waiting queue is at its bound; the client should retry later."""

    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(RivuletError):
    """The model is not loaded yet, the engine died, or the worker is shutting down."""

    type = "service_unavailable"
    code = "engine_unavailable"


class ClientGone(RivuletError):
    """The client closed its connection before its answer was ready; the work was cancelled."""

    type = "client_closed_request"
    code = "client_closed_request"


class RequestTimeout(RivuletError):
    type = "timeout"
    code = "request_timeout"


class Shutdown(RivuletError):
    type = "shutdown"
    code = "shutdown"


class ModelError(RivuletError):
    """The model (or a model package's ``infer``) raised while serving one request."""

    type = "model_error"
    code = "model_error"


class CheckpointError(RivuletError):
    """A directory is not a loadable checkpoint or model package. Raised at start-up."""

    type = "checkpoint_error"
    code = "checkpoint_error"


class CapacityError(RivuletError):
    """The settings ask for more memory than the device has (the KV cache). Raised at load."""

    type = "capacity_error"
    code = "capacity_error"


def error_for(reason: str) -> RivuletError | None:
    """The error a client sees for an ending that is not the model's own (None for stop, length, cancel)."""
    if reason == TIMEOUT:
        return RequestTimeout(TIMEOUT_MESSAGE)
    if reason == SHUTDOWN:
        return Shutdown("the server is shutting down; retry the request")
    return None

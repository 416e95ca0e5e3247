"""Non-streaming answers: a job's whole stream read into one object (``"stream": false``, ``/v1/infer``).

A non-streaming answer writes nothing until the end, so a client that hangs up is not noticed by a
failed write: ``client_gone`` is asked after every event and every ``DISCONNECT_PROBE_S`` of quiet, and
once it says yes the work is cancelled and ``ClientGone`` raised (logged as 499).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.api import CANCELLED, COMPLETED, Finished, PackageOutput, TextDelta, TokenLogprob
from models.errors import ClientGone, RivuletError
from service.jobs import Job

# How often a request with nothing to write looks for a gone client while the engine is quiet (queued,
# or in a long prefill); during generation it looks at every token.
DISCONNECT_PROBE_S = 1.0


def collect(job: Job, client_gone: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Read ``job`` to its end. -> the OpenAI response (or a package's last output). Raises the request's
    error if it failed."""
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    last_output: dict[str, Any] | None = None
    try:
        for event in job.events(quiet_s=DISCONNECT_PROBE_S):
            if client_gone is not None and not isinstance(event, Finished) and client_gone():
                raise ClientGone("the client closed the connection before the answer was ready")
            if isinstance(event, TextDelta):
                texts.append(event.text)
                logprobs.extend(event.logprobs)
            elif isinstance(event, PackageOutput):
                last_output = event.data
            elif isinstance(event, Finished):
                return _whole(job, event, "".join(texts), tuple(logprobs), last_output)
    finally:
        job.close()
    raise RivuletError("the stream ended without a result")  # unreachable: events() ends with Finished


def _whole(job: Job, finished: Finished, text: str, logprobs: tuple[TokenLogprob, ...],
           last_output: dict[str, Any] | None) -> dict[str, Any]:
    if finished.reason == CANCELLED:
        raise RivuletError("the request was cancelled")
    if finished.error is not None or finished.reason not in COMPLETED:
        error = finished.error
        raise error if isinstance(error, RivuletError) else RivuletError(f"the request failed: {error}")
    if job.shape is None:
        return last_output or {}
    return job.shape.whole(text, finished.reason, finished.prompt_tokens, finished.completion_tokens, logprobs)

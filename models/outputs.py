"""The third stage of an engine step: turn what the backend produced into events and endings.

``backend.execute(batch)`` returns one output per request it advanced: a sampled token (``Sampled``),
a request's own failure (``Failed``), or the backend's verdict that a request is over (``Ended``, a
package's ``infer`` returned). ``process`` turns tokens into text (incremental detokenization, stop
strings, EOS, max_tokens: ``models/sequence.py``), sends each request its ``TextDelta``, and finishes
the requests that ended, through ``Scheduler.finish``. No torch here: tested with plain objects.

Detokenization runs here, on the engine thread, not on the hub. Measured on the demo model (2-core
CPU): ``Sequence.append`` (incremental decode + stop strings) takes about 11 us a token against 3.2 ms
for a batch-1 decode step, 0.35% of the engine thread's time; on the hub the same work would be paid by
the one thread that every open connection shares. Text also has to be known here to end a request at a
stop string before the next step spends a row on it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from models.api import ERROR, TextDelta, TokenLogprob
from models.errors import ModelError, RivuletError
from models.scheduler import FINISHED, Scheduler, Ticket
from models.sequence import Sequence

log = logging.getLogger("rivulet.engine")

# What turning one request's token into text may raise (its tokenizer pieces, its stop strings): that
# request fails, the others go on.
DETOKENIZE_ERRORS = (RivuletError, ValueError, IndexError, KeyError, UnicodeError)


@dataclass(frozen=True, slots=True)
class Sampled:
    """An LLM row's next token (and its logprob, when the request asked for logprobs)."""

    ticket: Ticket
    token: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """One request's own failure (its prompt, NaN logits in its row, out of memory for its batch)."""

    ticket: Ticket
    error: RivuletError


@dataclass(frozen=True, slots=True)
class Ended:
    """The backend is done with a request (a package's ``infer`` returned): end it with ``reason``."""

    ticket: Ticket
    reason: str
    error: Exception | None = None


Output = Sampled | Failed | Ended


def process(scheduler: Scheduler, outputs: list[Output]) -> None:
    """Send every request its new text, then finish the requests that ended at this step."""
    endings: list[tuple[Ticket, str, Exception | None]] = []
    for output in outputs:
        ticket = output.ticket
        if isinstance(output, Sampled):
            if ticket.state == FINISHED:
                continue
            try:
                reason = emit_token(ticket, output.token, output.logprob)
            except DETOKENIZE_ERRORS as exc:
                log.warning("request %s failed turning a token into text: %s", ticket.request_id, exc)
                endings.append((ticket, ERROR, as_model_error(exc)))
                continue
            if reason:
                endings.append((ticket, reason, None))
        elif isinstance(output, Failed):
            endings.append((ticket, ERROR, output.error))
        else:
            endings.append((ticket, output.reason, output.error))
    for ticket, reason, error in endings:
        scheduler.finish(ticket, reason, error)


def emit_token(ticket: Ticket, token: int, logprob: TokenLogprob | None) -> str | None:
    """Append ``token`` to the request's sequence and send the text it completes. -> a finish reason."""
    seq: Sequence = ticket.work
    if logprob is not None:
        seq.pending_logprobs.append(logprob)
    text, reason = seq.append(token)
    ticket.completion_tokens = len(seq.output_ids)
    # Logprobs of held-back tokens wait for the next text, or go out with the last delta.
    logprobs: tuple[TokenLogprob, ...] = ()
    if seq.pending_logprobs and (text or reason):
        logprobs, seq.pending_logprobs = tuple(seq.pending_logprobs), []
    if text or logprobs:
        ticket.sink.put(TextDelta(text, ticket.completion_tokens, logprobs))
    return reason


def as_model_error(exc: Exception) -> RivuletError:
    """A request's own failure as the error its client sees (typed errors pass through)."""
    return exc if isinstance(exc, RivuletError) else ModelError(f"{type(exc).__name__}: {exc}")

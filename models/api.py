"""Types that cross between the web side and the engine thread.

The web side builds a ``GenerationRequest`` (or a ``PackageRequest``), hands it with a ``Sink`` to
``Engine.submit``, and reads events back from its own end of the sink. Events are small frozen
objects: the engine thread creates them, greenlets only read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI's: subtracted from a token's logit once if it was generated (presence), or per time (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF's / vLLM's: a token seen in the prompt or the output has its logit divided (if positive) or
    # multiplied (if negative) by this; 1 = off.
    repetition_penalty: float = 1.0
    # None = no logprobs; N = each generated token's log-probability and the N most likely alternatives.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class GenerationRequest:
    """One LLM generation: already tokenized, already validated."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    deadline: float  # time.monotonic() after which the request ends with a timeout


@dataclass
class PackageRequest:
    """One call of a model package's ``infer``: inputs already validated against its schema."""

    request_id: str
    inputs: dict[str, Any]
    deadline: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before temperature, penalties or
    filtering, as vLLM reports it), and the most likely alternatives at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text of an LLM stream (never half a UTF-8 character, never past a stop string).

    With logprobs asked for, ``logprobs`` covers every token generated since the previous delta: tokens
    whose text is still held back (half a character, a possible stop string) wait for the next one.
    """

    text: str
    completion_tokens: int  # tokens generated so far, this delta's included
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class PackageOutput:
    """One ``send_streamed_output(dict)`` of a model package."""

    data: dict[str, Any]


# Why a request ended: the model stopped (EOS, a stop string) or hit max_tokens / the context; the
# client left or DELETEd it; its time ran out; it failed; the worker shut down.
STOP, LENGTH, CANCELLED, TIMEOUT, ERROR, SHUTDOWN = "stop", "length", "cancelled", "timeout", "error", "shutdown"
COMPLETED = (STOP, LENGTH)  # the endings that are an answer, not an error


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every request. ``reason``: stop, length, cancelled, timeout, error, shutdown."""

    reason: str  # one of STOP, LENGTH, CANCELLED, TIMEOUT, ERROR, SHUTDOWN
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = field(default=None)


Event = TextDelta | PackageOutput | Finished


class Sink(Protocol):
    """Where the engine thread puts a request's events. ``put`` must be safe to call from that thread."""

    def put(self, event: Event) -> None: ...



"""One LLM request's token bookkeeping: incremental detokenization, stop strings, EOS, max_tokens.

No torch: the runner samples ids, a ``Sequence`` turns each into the text the client may see now
and, when the request is over, the finish reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.api import GenerationRequest, SamplingParams, TokenLogprob
from models.tokenizer import DECODE_CONTEXT_TOKENS, IncrementalDecoder, StopMatcher, Tokenizer


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    tokenizer: Tokenizer
    eos_ids: frozenset[int]
    max_length: int  # the context: prompt + output may not pass it
    output_ids: list[int] = field(default_factory=list)
    row: int = -1  # the runner's cache row while running
    generator: Any = None  # the runner's per-request RNG (a torch.Generator; no torch import here)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent with a TextDelta

    def __post_init__(self) -> None:
        context = self.request.prompt_ids[-DECODE_CONTEXT_TOKENS:]
        self.decoder = IncrementalDecoder(self.tokenizer, context)
        self.stop = StopMatcher(self.request.sampling.stop)

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def append(self, token: int) -> tuple[str, str | None]:
        """Take the next sampled token. -> (text to send now, finish reason or None)."""
        self.output_ids.append(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            return self._flush("stop")
        text, stopped = self.stop.push(self.decoder.push(token))
        if stopped:
            return text, "stop"
        # The newest token is not in the cache yet; decoding it would need a position past the context.
        if len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_length:
            more, reason = self._flush("length")
            return text + more, reason
        return text, None

    def _flush(self, reason: str) -> tuple[str, str]:
        """The end of the stream: release held text, which may still complete a stop string."""
        text, stopped = self.stop.push(self.decoder.flush())
        if stopped:
            return text, "stop"
        return text + self.stop.flush(), reason

"""One LLM request's token bookkeeping: incremental detokenization, stop strings, EOS, max_tokens.

No torch: the runner samples ids, a ``Sequence`` turns each into the text the client may see now
and, when the request is over, the finish reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from models.api import GenerationRequest
from models.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    tokenizer: Tokenizer
    eos_ids: frozenset[int]
    max_length: int  # the context: prompt + output may not pass it
    output_ids: list[int] = field(default_factory=list)
    row: int = -1  # the runner's cache row while running
    generator: object = None  # the runner's per-request RNG

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.tokenizer)
        self.stop = StopMatcher(self.request.sampling.stop)

    @property
    def params(self):
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
            return self._flush(), "stop"
        text, stopped = self.stop.push(self.decoder.push(token))
        if stopped:
            return text, "stop"
        if len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_length:
            return text + self._flush(), "length"
        return text, None

    def _flush(self) -> str:
        text, stopped = self.stop.push(self.decoder.flush())
        return text if stopped else text + self.stop.flush()

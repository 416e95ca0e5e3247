"""How many prompt tokens the next chunk of a long prompt gets, from measured step times.

A chunk rides in the running rows' decode pass (``Llama.decode_with_chunk``), so every running stream
waits for it. A fixed chunk size is right for one machine and one load only: 256 tokens cost little
beside a decode step on a GPU but several decode steps on a CPU, and a decode step of 4 rows is far
cheaper than one of 64. So the chunk is sized to add about ``share`` of a plain decode step: the
running streams' gap between tokens then grows by that factor at most (1.75x with the default),
whatever the hardware and the load. With no stream decoding nobody waits, and the chunk is the largest
allowed.

In one pass with the decode step, a chunk costs its tokens' arithmetic and attention, not another
read of the weights: about ``per_token * tokens``. The budget keeps moving averages of a plain decode
step's time and of the extra time per chunk token of steps with a chunk, and follows both as the load
changes and as the prompt's growing attention span makes its later chunks dearer.
"""
from __future__ import annotations

# Weight of the newest measurement in the moving averages: steps are noisy (the hub shares the CPU), and
# the load changes over seconds, not steps.
SMOOTHING = 0.25
# The cost per chunk token is followed faster up than down: one chunk too large costs every running
# stream a long gap, one too small costs the long prompt a little time.
RISING, FALLING = 0.5, 0.1
# Chunk cost as a fraction of the decode step it rides beside.
DEFAULT_SHARE = 0.75
# Fewer tokens a step and a long prompt would crawl (2,000 tokens would take over 125 steps), whatever
# the running streams' gaps.
MIN_CHUNK = 16
# A chunk at most this many times the previous one: a step measured quick by chance cannot make the
# next chunk huge.
MAX_GROWTH = 2


def _average(old: float | None, new: float, weight: float = SMOOTHING) -> float:
    return new if old is None else old + weight * (new - old)


class ChunkBudget:
    def __init__(self, max_tokens: int, share: float = DEFAULT_SHARE, min_tokens: int = MIN_CHUNK) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.max_tokens = max_tokens
        self.min_tokens = min(min_tokens, max_tokens)
        self.share = share
        self.decode_s: float | None = None  # moving average of a plain decode step's seconds
        self.per_token_s: float | None = None  # moving average of the seconds a chunk token adds to a step
        self.last_chunk = 0  # the size chosen last while rows decoded

    def record_step(self, seconds: float, chunk_tokens: int = 0, decoding_rows: int = 1) -> None:
        """A decode step of ``decoding_rows`` rows took ``seconds``, with a chunk of ``chunk_tokens``
        beside it (0: none)."""
        if chunk_tokens <= 0:
            self.decode_s = _average(self.decode_s, seconds)
            return
        if self.decode_s is None:
            return  # nothing to tell the chunk's share from
        if self.per_token_s is None:  # the first guess: a chunk token costs what a decoding row does
            self.per_token_s = self.decode_s / max(1, decoding_rows)
        per_token = max(0.0, seconds - self.decode_s) / chunk_tokens  # noise can make it negative
        self.per_token_s = _average(self.per_token_s, per_token, RISING if per_token > self.per_token_s else FALLING)

    def next_chunk(self, decoding_rows: int) -> int:
        """Prompt tokens for the chunk of a step that also decodes ``decoding_rows`` streams."""
        if decoding_rows == 0:
            return self.max_tokens  # nobody waits on this step
        if self.decode_s is None or self.per_token_s is None:
            tokens = self.share * decoding_rows  # a prompt token costs about what a decoding row does
        elif self.per_token_s <= 0:
            tokens = self.max_tokens
        else:
            tokens = self.share * self.decode_s / self.per_token_s
        if self.last_chunk:
            tokens = min(tokens, MAX_GROWTH * self.last_chunk)
        self.last_chunk = max(self.min_tokens, min(self.max_tokens, int(tokens)))
        return self.last_chunk

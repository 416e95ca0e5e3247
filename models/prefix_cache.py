"""Prefix caching: a new prompt that begins like a running row's prompt starts from a copy of its keys.

Chat deployments send one system prompt (often hundreds or thousands of tokens) in front of every
conversation. Its keys and values are the same in every row that starts with it (attention is causal: a
position's keys depend on the tokens up to it only), so a new request whose prompt shares a long prefix
with a request already running copies that row's cached prefix (one copy per layer, no arithmetic) and
computes only the rest of its prompt, attending to the copied keys (``Llama.prefill_chunk``).

The sources are the rows running now: the cache has one row per running request (models/runner.py),
and a finished request's row is reused at once. Under steady chat load (many conversations with the same
system prompt) some row nearly always holds it. A prompt identical to one a row still holds, running or
not, is models/row_prompts.py's: it is not computed at all.
"""
from __future__ import annotations

from collections.abc import Sequence

# Shorter shared prefixes are computed with the rest: one row's copy and a pass of its own cost more
# than the few positions saved in a batched prefill.
MIN_SHARED_TOKENS = 64


def shared_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """The length of the common prefix of ``a`` and ``b``, at most ``limit``. Binary search on slice
    equality (compared in C), not a Python loop over thousands of tokens per running row."""
    low, high = 0, min(len(a), len(b), limit)  # a[:low] == b[:low] holds; a[:high+1] is past the answer
    if high > 0 and a[:high] == b[:high]:
        return high
    while low + 1 < high:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def best_source(prompt: Sequence[int], candidates: list[tuple[int, Sequence[int], int]]) -> tuple[int, int] | None:
    """The row to copy ``prompt``'s prefix from: ``candidates`` are (row, that row's prompt, positions it
    has cached). -> (row, shared tokens), or None when no row shares ``MIN_SHARED_TOKENS`` or more.

    At least the prompt's last token is always left to compute: its logits give the first token."""
    best: tuple[int, int] | None = None
    for row, other, cached in candidates:
        if len(other) < MIN_SHARED_TOKENS or other[:MIN_SHARED_TOKENS] != prompt[:MIN_SHARED_TOKENS]:
            continue  # the usual case, decided by one short comparison
        shared = shared_prefix(prompt, other, min(len(prompt) - 1, cached))
        if shared >= MIN_SHARED_TOKENS and (best is None or shared > best[1]):
            best = (row, shared)
    return best

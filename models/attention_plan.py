"""Which rows of a decode step attend on their own, so that one long row does not make every row long.

The decode step attends over a view of the cache, rows 0..B-1 by keys 0..L-1, masked per row: its cost
is B x L, L being the longest row's length. One long conversation among short ones (a 2,000-token
prompt beside 32 chats of 100 tokens) would make all 33 rows attend over 2,000 keys, several times the
step's usual cost. So the few longest rows may be taken out: the rest attend over their own longest
length, and each row taken out attends alone over exactly its keys (no mask, no copy: a view of its
row), at the price of a few more small operations.
"""
from __future__ import annotations

from dataclasses import dataclass

# At most this many rows attend alone: each costs a few small operations a layer.
MAX_ALONE = 4
# What one more row attending alone costs, in key positions of the shared attention (its dispatch
# overhead next to the arithmetic saved): a row is taken out only if that saves more than this.
ALONE_OVERHEAD_KEYS = 512


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    shared_keys: int  # keys every row of the shared attention covers (its longest row's length)
    alone: tuple[tuple[int, int], ...] = ()  # (row, length) of each row that attends on its own


def plan_decode_attention(lengths: list[int]) -> AttentionPlan:
    """``lengths[b]``: how many keys row b attends to this step (its position + 1). -> the cheapest plan:
    the shared attention's cost (rows x keys) plus each lone row's own keys and overhead."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    rows = len(lengths)
    best_cost, best_out = rows * lengths[order[0]], 0
    for out in range(1, min(MAX_ALONE, rows - 1) + 1):
        alone_cost = sum(lengths[r] + ALONE_OVERHEAD_KEYS for r in order[:out])
        cost = rows * lengths[order[out]] + alone_cost
        if cost < best_cost:
            best_cost, best_out = cost, out
    if best_out == 0:
        return AttentionPlan(lengths[order[0]])
    return AttentionPlan(lengths[order[best_out]], tuple((r, lengths[r]) for r in sorted(order[:best_out])))

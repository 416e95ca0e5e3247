"""Which prompt each KV-cache row holds, so that the same prompt again is not computed again.

A cache row's positions 0..n-1 hold the keys and values of the prompt prefilled into it, and decoding
writes only past them: they stay intact while the request runs, and after it ends, until something else
is written into the row. With the prompt's last-position logits kept beside them, a new request with the
very same prompt needs no arithmetic at all: its row takes a copy of those positions (none if it is the
same row) and its first token is sampled from the kept logits with its own parameters.

That is what a burst of identical prompts looks like (a demo's example prompt, retries, load tests: 64
clients sending one prompt at once cost one prompt's prefill instead of 64), and one client asking again
after its stream ended finds its row as it left it, as llama.cpp's server keeps a slot's prompt. Shared
prefixes of different prompts are models/prefix_cache.py's job.

The runner reports every write that touches a row's prompt positions (``forget``, ``moved``), so an entry
is only ever read while the positions it describes are intact.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class HeldPrompt:
    tokens: tuple[int, ...]
    logits: torch.Tensor  # [V], the prompt's last position's, as computed


class RowPrompts:
    def __init__(self) -> None:
        self._rows: dict[int, HeldPrompt] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def hold(self, row: int, prompt: Sequence[int], logits: torch.Tensor) -> None:
        """``row`` now holds ``prompt`` at positions 0..len-1; ``logits`` [V] are its last position's."""
        self._rows[row] = HeldPrompt(tuple(prompt), logits.detach().clone())

    def forget(self, row: int) -> None:
        """Something is about to overwrite ``row``'s first positions."""
        self._rows.pop(row, None)

    def moved(self, src: int, dst: int, length: int) -> None:
        """``dst``'s first ``length`` positions are now a copy of ``src``'s."""
        held = self._rows.get(src)
        if held is not None and len(held.tokens) <= length:
            self._rows[dst] = held
        else:
            self._rows.pop(dst, None)

    def find(self, prompt: Sequence[int], prefer: int | None = None) -> tuple[int, torch.Tensor] | None:
        """A row holding exactly ``prompt`` (``prefer`` if it is one: no copy needed). -> (row, its logits)"""
        key = tuple(prompt)
        if prefer is not None:
            held = self._rows.get(prefer)
            if held is not None and held.tokens == key:
                return prefer, held.logits
        for row, held in self._rows.items():
            if len(held.tokens) == len(key) and held.tokens == key:
                return row, held.logits
        return None

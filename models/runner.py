"""The batched model runner: one cache row per running sequence, prefill, one shared decode step.

Rows are kept compact: running sequences always occupy rows 0..B-1, so the decode step attends over a
view of the cache. When a sequence leaves, the last row's cache moves into its place (one copy per
finished request, not per step).
"""
from __future__ import annotations

import torch

from models.llama import Llama
from models.sampling import make_generator, sample
from models.sequence import Sequence


class LlamaRunner:
    def __init__(self, model: Llama, max_batch: int) -> None:
        self.model = model
        self.device = model.lm_head.weight.device
        self.max_batch = max_batch
        model.setup_cache(max_batch)
        self.rows: list[Sequence] = []

    def prefill(self, seq: Sequence) -> int:
        """Put ``seq`` in a free row, run its prompt, -> its first sampled token."""
        if len(self.rows) >= self.max_batch:
            raise RuntimeError("no free cache row")  # the scheduler never admits past max_batch
        seq.row = len(self.rows)
        self.rows.append(seq)
        seq.generator = make_generator(seq.params, self.device)
        prompt = torch.tensor(seq.request.prompt_ids, dtype=torch.long, device=self.device).unsqueeze(0)
        logits = self.model.prefill(prompt, seq.row)  # [V]
        return sample(logits.unsqueeze(0), [seq.params], [seq.generator])[0]

    def decode(self) -> list[tuple[Sequence, int]]:
        """One step for every running sequence. -> (sequence, its next token) in row order."""
        if not self.rows:
            return []
        tokens = torch.tensor([s.last_token for s in self.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([s.num_tokens - 1 for s in self.rows], dtype=torch.long, device=self.device)
        logits = self.model.decode(tokens, positions)  # [B, V]
        next_tokens = sample(logits, [s.params for s in self.rows], [s.generator for s in self.rows])
        return list(zip(list(self.rows), next_tokens))

    def release(self, seq: Sequence) -> None:
        """Free ``seq``'s row; the last row moves into the hole to keep rows compact."""
        if seq.row < 0 or seq.row >= len(self.rows) or self.rows[seq.row] is not seq:
            return
        last = self.rows[-1]
        if last is not seq:
            cached = last.num_tokens - 1  # positions written so far: the newest token is not cached yet
            self.model.move_cache_row(last.row, seq.row, cached)
            self.rows[seq.row] = last
            last.row = seq.row
        self.rows.pop()
        seq.row = -1

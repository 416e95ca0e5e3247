"""Turning a batch of logits into next tokens, each row with its own sampling parameters."""
from __future__ import annotations

import torch

from models.api import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request RNG: the same seed gives the same text, whatever else shares the batch."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p for one row. logits [V] -> filtered logits [V] (fp32)."""
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, V] -> one token id per row."""
    tokens = torch.argmax(logits, dim=-1).tolist()  # greedy rows are done here, all at once
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = filter_logits(logits[row], p).softmax(-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens

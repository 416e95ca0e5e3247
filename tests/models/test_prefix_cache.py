"""Prefix caching: which row a prompt's prefix is copied from, and that the copy changes no token."""
from __future__ import annotations

import random

import pytest
import torch

from models.api import GenerationRequest, SamplingParams
from models.prefix_cache import MIN_SHARED_TOKENS, best_source, shared_prefix
from models.runner import LlamaRunner
from models.sequence import Sequence
from tests.models.support import random_model, tiny_config

SYSTEM = [1] + [random.Random(0).randrange(5, 400) for _ in range(99)]  # a 100-token "system prompt"


@pytest.mark.parametrize("a, b, limit, expected", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 10, 4),
    ([1, 2, 3, 4], [1, 2, 9, 4], 10, 2),
    ([1, 2, 3, 4], [7, 2, 3, 4], 10, 0),
    ([1, 2, 3, 4], [1, 2, 3], 10, 3),
    (list(range(1000)), list(range(999)) + [5], 10_000, 999),
    (list(range(1000)), list(range(1000)), 700, 700),
])
def test_shared_prefix(a, b, limit, expected):
    assert shared_prefix(a, b, limit) == expected


def test_the_longest_shared_prefix_wins_and_a_short_one_is_not_worth_a_copy():
    prompt = SYSTEM + [7, 8, 9]
    candidates = [(0, SYSTEM[:80] + [3] * 30, 110), (1, SYSTEM + [4, 4], 500), (2, [1, 2, 3], 3)]
    assert best_source(prompt, candidates) == (1, 100)
    assert best_source(prompt, [(0, SYSTEM[:MIN_SHARED_TOKENS - 1] + [3] * 50, 500)]) is None
    # Never the whole prompt (its last token's logits are the first token), never past what is cached.
    assert best_source(SYSTEM, [(1, SYSTEM + [4], 500)]) == (1, 99)
    assert best_source(prompt, [(1, SYSTEM, 70)]) == (1, 70)


def sequence(prompt: list[int], max_tokens: int = 8) -> Sequence:
    request = GenerationRequest(f"r{len(prompt)}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                         ignore_eos=True), 1e12)
    return Sequence(request, None, frozenset(), 128)


def generate(runner: LlamaRunner, first: list[int], second: list[int], *,
             chunk: int = 0) -> tuple[list[int], list[torch.Tensor]]:
    """Run ``first`` for a few steps, then bring in ``second`` (prefilled, or in chunks of ``chunk``
    beside the decoding) and -> ``second``'s greedy tokens, and its prompt's cached keys and values."""
    with torch.inference_mode():
        running = sequence(first, max_tokens=30)
        running.output_ids.append(runner.prefill([running])[0].token)
        for _ in range(3):
            running.output_ids.append(runner.decode()[0].token)
        arriving = sequence(second)
        if chunk:
            result = None
            while result is None:
                results = runner.decode(arriving, chunk)
                running.output_ids.append(results[0].token)
                result = results[1] if len(results) > 1 else None
        else:
            result = runner.prefill([arriving])[0]
        arriving.output_ids.append(result.token)
        caches = [layer.self_attn.cache for layer in runner.model.model.layers]
        prompt_kv = [t[arriving.row, :, :len(second)].clone() for c in caches for t in (c.k, c.v)]
        while len(arriving.output_ids) < 8:
            arriving.output_ids.append(runner.decode()[1].token)
    return arriving.output_ids, prompt_kv


@pytest.mark.parametrize("chunk", [0, 16])  # a short prompt prefilled, a long one in chunks
def test_a_prompt_that_begins_like_a_running_one_copies_its_prefix_and_gets_the_same_tokens(chunk):
    model = random_model(tiny_config(max_position_embeddings=128), seed=7)
    model.fuse_projections()
    first, second = SYSTEM + [11, 12, 13], SYSTEM + [21, 22]
    without = LlamaRunner(model, max_batch=3, prefix_caching=False)
    expected_tokens, expected_kv = generate(without, first, second, chunk=chunk)
    assert without.prefix_tokens_reused == 0
    cached = LlamaRunner(model, max_batch=3)
    tokens, kv = generate(cached, first, second, chunk=chunk)
    assert cached.prefix_tokens_reused == 100  # the system prompt was copied, not computed
    assert tokens == expected_tokens
    for got, want in zip(kv, expected_kv):  # every layer's keys and values of the whole prompt
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_prompt_sharing_little_is_computed_whole():
    model = random_model(tiny_config(max_position_embeddings=128), seed=7)
    model.fuse_projections()
    runner = LlamaRunner(model, max_batch=3)
    generate(runner, SYSTEM + [11], SYSTEM[:MIN_SHARED_TOKENS - 1] + [30] * 40)
    assert runner.prefix_tokens_reused == 0

"""The same prompt again is copied from the row that holds it, never computed twice, and never read from a
row that something else has overwritten since (models/row_prompts.py, LlamaRunner.prefill)."""
from __future__ import annotations

import torch

from models.api import GenerationRequest, SamplingParams
from models.row_prompts import RowPrompts
from models.runner import LlamaRunner
from models.sequence import Sequence
from tests.models.support import random_model, tiny_config

PROMPT = [1, 17, 230, 41, 99, 5, 64]
OTHER = [1, 300, 12, 12, 77]


def test_a_row_holds_a_prompt_until_it_is_overwritten_and_moves_with_a_copy():
    held = RowPrompts()
    held.hold(3, PROMPT, torch.arange(5.0))
    row, logits = held.find(PROMPT)
    assert row == 3 and torch.equal(logits, torch.arange(5.0))
    assert held.find(PROMPT[:-1]) is None and held.find(PROMPT + [2]) is None  # exactly the prompt
    held.moved(3, 0, len(PROMPT))  # row 0 now holds a copy of row 3's prompt positions
    assert held.find(PROMPT, prefer=0)[0] == 0 and held.find(PROMPT, prefer=3)[0] == 3
    held.hold(1, OTHER, torch.ones(5))
    held.moved(3, 1, len(PROMPT) - 1)  # part of it only, over OTHER: row 1 holds no whole prompt now
    assert held.find(PROMPT, prefer=1)[0] != 1 and held.find(OTHER) is None
    held.hold(2, OTHER, torch.ones(5))
    held.moved(4, 2, 100)  # from a row that holds nothing known
    assert held.find(OTHER) is None
    held.forget(3)
    held.forget(0)
    assert held.find(PROMPT) is None and len(held) == 0


def test_held_logits_are_a_copy():
    held = RowPrompts()
    logits = torch.zeros(4)
    held.hold(0, PROMPT, logits)
    logits += 1
    assert torch.equal(held.find(PROMPT)[1], torch.zeros(4))


def sequence(prompt: list[int], name: str, max_tokens: int = 6, seed: int | None = None) -> Sequence:
    params = SamplingParams(temperature=0.0 if seed is None else 0.9, seed=seed, max_tokens=max_tokens,
                            ignore_eos=True)
    return Sequence(GenerationRequest(name, prompt, params, 1e12), None, frozenset(), 128)


class CountingRunner(LlamaRunner):
    """Counts the prompt tokens the model computes (prefills of whole prompts, or of their rest)."""

    computed = 0

    def _prefill_group(self, group):
        self.computed += sum(len(s.request.prompt_ids) for s in group)
        return super()._prefill_group(group)

    def _prefill_rest(self, seq, start):
        self.computed += len(seq.request.prompt_ids) - start
        return super()._prefill_rest(seq, start)


def runner(prefix_caching: bool = True, max_batch: int = 6) -> CountingRunner:
    model = random_model(tiny_config(), seed=11)
    return CountingRunner(model, max_batch=max_batch, prefix_caching=prefix_caching)


@torch.inference_mode()
def run(runner: LlamaRunner, seqs: list[Sequence]) -> list[list[int]]:
    """Prefill ``seqs`` together and decode them to their ``max_tokens``, then release them."""
    for result in runner.prefill(seqs):
        assert result.error is None
        result.seq.output_ids.append(result.token)
    while any(len(s.output_ids) < s.params.max_tokens for s in seqs):
        for result in runner.decode():
            result.seq.output_ids.append(result.token)
    for seq in seqs:
        runner.release(seq)
    return [s.output_ids for s in seqs]


def reference(prompt: list[int], seed: int | None = None) -> list[int]:
    """``prompt``'s tokens from a runner that has never seen it, prefix caching off."""
    return run(runner(prefix_caching=False), [sequence(prompt, "ref", seed=seed)])[0]


def test_a_burst_of_one_prompt_computes_it_once_and_every_stream_gets_its_tokens():
    served = runner()
    outputs = run(served, [sequence(PROMPT, f"r{i}") for i in range(4)] + [sequence(OTHER, "other")])
    assert served.computed == len(PROMPT) + len(OTHER)
    assert served.prefix_tokens_reused == 3 * len(PROMPT)
    assert outputs == [reference(PROMPT)] * 4 + [reference(OTHER)]


def test_a_prompt_asked_again_after_its_stream_ended_is_not_computed_again():
    served = runner()
    first = run(served, [sequence(PROMPT, "first")])
    computed = served.computed
    again = run(served, [sequence(PROMPT, "again")])
    assert served.computed == computed and served.prefix_tokens_reused == len(PROMPT)
    assert again == first == [reference(PROMPT)]


def test_a_sampled_request_draws_from_the_held_logits_with_its_own_seed():
    served = runner()
    run(served, [sequence(PROMPT, "greedy")])
    seeded = run(served, [sequence(PROMPT, "s1", seed=1), sequence(PROMPT, "s2", seed=2)])
    assert served.computed == len(PROMPT)
    assert seeded == [reference(PROMPT, seed=1), reference(PROMPT, seed=2)]


def test_a_row_overwritten_by_another_prompt_is_not_read_for_the_old_one():
    served = runner(max_batch=2)
    run(served, [sequence(PROMPT, "a")])  # row 0 holds PROMPT
    run(served, [sequence(OTHER, "b")])  # row 0 now holds OTHER
    computed = served.computed
    assert run(served, [sequence(PROMPT, "c")]) == [reference(PROMPT)]
    assert served.computed == computed + len(PROMPT)  # computed again, not read from the overwritten row


@torch.inference_mode()
def test_a_prompt_follows_its_row_when_the_last_row_moves_into_a_hole():
    served = runner(max_batch=3)
    a, b = sequence(OTHER, "a", max_tokens=30), sequence(PROMPT, "b", max_tokens=30)
    for result in served.prefill([a, b]):
        result.seq.output_ids.append(result.token)
    served.decode()
    served.release(a)  # b (row 1, holding PROMPT) moves into row 0, over OTHER
    assert b.row == 0
    computed = served.computed
    # Row 0 no longer holds OTHER: it is computed (into row 1, over the copy of PROMPT left there).
    assert run(served, [sequence(OTHER, "other again")]) == [reference(OTHER)]
    assert served.computed == computed + len(OTHER)
    # Now only row 0 (b, moved) holds PROMPT: a new request for it is copied from there.
    assert run(served, [sequence(PROMPT, "late")]) == [reference(PROMPT)]
    assert served.computed == computed + len(OTHER)
    served.release(b)


def test_without_prefix_caching_every_prompt_is_computed():
    served = runner(prefix_caching=False)
    run(served, [sequence(PROMPT, "a"), sequence(PROMPT, "b")])
    run(served, [sequence(PROMPT, "c")])
    assert served.computed == 3 * len(PROMPT) and served.prefix_tokens_reused == 0


def test_a_prefill_that_fails_midway_leaves_no_stale_prompt_behind():
    served = runner(max_batch=2)
    run(served, [sequence(PROMPT, "a")])  # row 0 holds PROMPT

    def failing_prefill(tokens, rows, lengths):  # overwrites the rows' first positions, then fails
        for layer in served.model.model.layers:
            layer.self_attn.cache.k[rows] = 0.0
        raise RuntimeError("out of memory")

    real_prefill = served.model.prefill
    served.model.prefill = failing_prefill
    doomed = sequence(OTHER, "doomed")
    try:
        with torch.inference_mode():
            served.prefill([doomed])
    except RuntimeError:
        pass
    served.release(doomed)
    served.model.prefill = real_prefill
    computed = served.computed
    assert run(served, [sequence(PROMPT, "again")]) == [reference(PROMPT)]
    assert served.computed > computed


@torch.inference_mode()
def test_a_long_prompt_chunked_into_a_row_that_held_a_prompt_makes_it_forget_it():
    served = runner(max_batch=2)  # row 1 is where long prompts are prefilled in chunks
    run(served, [sequence(OTHER, "a"), sequence(PROMPT, "b")])  # row 1 holds PROMPT
    long = sequence([1] + list(range(20, 60)), "long")
    result = None
    while result is None:  # chunks of 8 into row 1, from position 0; then it moves to row 0
        result = served.prefill_chunk(long, 8)
    long.output_ids.append(result.token)
    computed = served.computed
    assert run(served, [sequence(PROMPT, "again")]) == [reference(PROMPT)]
    assert served.computed == computed + len(PROMPT)
    served.release(long)

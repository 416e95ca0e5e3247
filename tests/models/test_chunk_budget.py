"""The chunk of a long prompt is sized from measured step times (no torch, no clock: fed numbers)."""
import pytest

from models.chunk_budget import ChunkBudget


def settle(budget: ChunkBudget, decode_s: float, per_token_s: float, rows: int) -> int:
    """Steps on a machine where a decode step takes ``decode_s`` and each chunk token adds ``per_token_s``
    to it, a plain step now and then. -> the chunk size settled on."""
    tokens = 0
    for step in range(80):
        if step % 10 == 0:
            budget.record_step(decode_s)
        tokens = budget.next_chunk(rows)
        budget.record_step(decode_s + per_token_s * tokens, tokens, rows)
    return tokens


def test_with_nobody_decoding_the_chunk_is_the_largest():
    budget = ChunkBudget(256)
    assert budget.next_chunk(0) == 256
    budget.record_step(0.030)
    budget.record_step(0.050, 20)
    assert budget.next_chunk(0) == 256


def test_before_any_chunk_is_timed_a_prompt_token_is_guessed_at_a_decoding_row():
    assert ChunkBudget(256).next_chunk(32) == 24  # 0.75 x 32 rows
    budget = ChunkBudget(256)
    budget.record_step(0.030)
    assert budget.next_chunk(4) == 16  # never below the minimum


def test_the_chunk_settles_where_it_adds_the_share_of_a_decode_step():
    # A CPU: a 32-row decode step takes 26 ms; each chunk token adds 0.5 ms.
    tokens = settle(ChunkBudget(256), decode_s=0.026, per_token_s=0.0005, rows=32)
    assert abs(tokens - 0.75 * 0.026 / 0.0005) <= 1  # 39: the step then takes 1.75x a plain one
    # A GPU-like one: a chunk token is cheap next to the step, so the largest chunk fits.
    assert settle(ChunkBudget(256), decode_s=0.010, per_token_s=0.000001, rows=32) == 256


def test_the_chunk_follows_the_load_and_the_prompt():
    budget = ChunkBudget(512)
    few = settle(budget, decode_s=0.010, per_token_s=0.0005, rows=4)
    many = settle(budget, decode_s=0.040, per_token_s=0.0005, rows=64)
    assert few < many  # a slower decode step can wait for a larger chunk
    # The prompt's later chunks attend to more keys and cost more a token: the chunk shrinks.
    dearer = settle(budget, decode_s=0.040, per_token_s=0.0010, rows=64)
    assert dearer < many


def test_a_chunk_grows_at_most_twofold_a_step():
    budget = ChunkBudget(256)
    assert settle(budget, decode_s=0.005, per_token_s=0.0005, rows=4) == 16
    for _ in range(20):  # many more rows now: a decode step is far slower, a large chunk would fit
        budget.record_step(0.200)
    assert [budget.next_chunk(64) for _ in range(4)] == [32, 64, 128, 256]


def test_one_dear_step_shrinks_the_next_chunk_at_once():
    budget = ChunkBudget(256)
    settle(budget, decode_s=0.030, per_token_s=0.0003, rows=32)
    before = budget.next_chunk(32)
    budget.record_step(0.030 + 0.0030 * before, before, 32)  # ten times dearer (the hub took the core)
    assert budget.next_chunk(32) <= before * 0.6


@pytest.mark.parametrize("max_tokens", [1, 8])
def test_a_small_maximum_bounds_the_minimum(max_tokens):
    budget = ChunkBudget(max_tokens)
    budget.record_step(1.0)
    budget.record_step(11.0, 1, 32)
    assert budget.next_chunk(32) == max_tokens


def test_a_maximum_below_one_is_refused():
    with pytest.raises(ValueError):
        ChunkBudget(0)

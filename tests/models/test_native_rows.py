"""The batched decode step in C (``NativeStep.rows``, ``decode_rows`` in models/native_kernels.c): the logits
and cache writes of ``Llama.decode`` for rows at different positions, whatever the batch's size (its
product packs rows in panels of 16, the last of 8 where at most 8 are left); a row's result does not
depend on the rows beside it; bad input writes nothing; and the product on its own against torch's."""
from __future__ import annotations

import pytest
import torch

from models import native_build, native_step
from models.llama import Llama
from tests.models.support import greedy_run_with, native_product, prepared, random_model, tiny_config

pytestmark = pytest.mark.skipif(native_build.load() is None, reason="no C compiler for the native kernels")

CONFIGS = {
    "grouped": tiny_config(),  # 4 query heads over 2 key/value heads, head_dim 16
    "one kv head, head_dim 8": tiny_config(num_attention_heads=8, num_key_value_heads=1),
    "head_dim 64, tied": tiny_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                     tie_word_embeddings=True),
}


def caches(model: Llama) -> list:
    return [layer.self_attn.cache for layer in model.model.layers]


def torch_step(model: Llama, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, list]:
    """``Llama.decode``'s logits and the caches it leaves, the caches then put back as they were."""
    before = [(c.k.clone(), c.v.clone()) for c in caches(model)]
    logits = model.decode(torch.tensor(tokens), torch.tensor(positions), max(positions) + 1, ragged=True)
    written = [(c.k.clone(), c.v.clone()) for c in caches(model)]
    for cache, (k, v) in zip(caches(model), before):
        cache.k.copy_(k)
        cache.v.copy_(v)
    return logits, written


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [2, 8, 9, 16, 20, 25, 33])  # panels: 8; 8; 16; 16; 16+8; 16+16; 16+16+8
@torch.inference_mode()
def test_a_step_gives_the_logits_and_cache_writes_of_the_torch_step(name, batch):
    model = prepared(CONFIGS[name], rows=batch)
    step = native_step.bind(model)
    # Each row one past its prompt, and one row at 100: attention past one block of 64 keys.
    positions = [3 + row % 10 for row in range(batch)]
    positions[batch // 2] = 100
    tokens = [(17 * row + 5) % model.config.vocab_size for row in range(batch)]
    expected, expected_caches = torch_step(model, tokens, positions)
    native = step.rows(tokens, positions)
    torch.testing.assert_close(native, expected, rtol=1e-5, atol=1e-5)
    for cache, (k, v) in zip(caches(model), expected_caches):
        torch.testing.assert_close(cache.k, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v, v, rtol=1e-5, atol=1e-5)
    assert step.batched_steps == 1


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("batch", [2, 3, 4, 5, 8])  # one group of four rows; two (the second partial, full)
@torch.inference_mode()
def test_up_to_eight_rows_each_row_gets_the_bits_of_a_one_row_step(batch, quantized):
    """A few rows' products read each weight row once for all of them, summing each output in the one-row
    step's order: cache row 0's logits are the same bits beside 1-7 other rows as alone."""
    # 80 inputs: a 16-wide body and a tail; 1100 (the MLP's down): past one segment of 512
    model = prepared(tiny_config(hidden_size=80, intermediate_size=1100), rows=batch, quantized=quantized)
    step = native_step.bind(model)
    few = step.rows([7] + list(range(30, 29 + batch)), [3] + [5] * (batch - 1))
    alone = step(7, 3)
    assert torch.equal(few[0], alone[0])


@torch.inference_mode()
def test_past_eight_rows_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """Packed, each output is summed in the same order whatever the batch: the same row gives the same bits
    beside 8 others or beside 20 others with other tokens (panels of 16 and 8, of 16, 16 and 8)."""
    model = prepared(tiny_config(), rows=25)
    step = native_step.bind(model)
    nine = step.rows([7] + list(range(8, 16)), [3] + [4] * 8)
    many = step.rows([7, 99] + list(range(30, 53)), [3, 9] + [5] * 23)
    assert torch.equal(nine[0], many[0])


@torch.inference_mode()
def test_bad_input_raises_and_writes_nothing():
    model = prepared(tiny_config(max_position_embeddings=16), rows=4)
    step = native_step.bind(model)
    before = [c.k.clone() for c in caches(model)]
    vocab = model.config.vocab_size
    for tokens, positions in (([5, vocab], [3, 4]), ([5, -1], [3, 4]), ([5, 6], [3, 16]), ([5, 6], [-1, 4]),
                              ([1] * 5, [3] * 5), ([5, 6], [3])):  # 5 rows in a 4-row cache; a missing position
        with pytest.raises(ValueError):
            step.rows(tokens, positions)
    assert all(torch.equal(c.k, k) for c, k in zip(caches(model), before))
    assert step.batched_steps == 0


def test_the_runners_batched_steps_go_through_it_with_the_same_tokens():
    config = tiny_config(max_position_embeddings=128)
    without, _ = greedy_run_with(random_model(config, seed=9), native_kernels=False)
    tokens, runner = greedy_run_with(random_model(config, seed=9))
    assert runner.native_step.batched_steps == 7  # three rows for seven steps, then one alone (greedy_run_with)
    assert runner.native_step.steps == 5
    assert tokens == without


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, 24, 40])
@pytest.mark.parametrize("out_features, in_features", [(6, 16), (13, 7), (1, 33), (50, 64)])
def test_the_product_equals_torchs(rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * 100 + out_features)
    storage = torch.randn(out_features, in_features + 3, generator=generator)
    weight = storage[:, :in_features]  # rows with a stride past their length
    x = torch.randn(rows, in_features, generator=generator)
    torch.testing.assert_close(native_product(weight, x), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_with_the_native_step_rivulet_compile_compiles_nothing(caplog):
    """The native step takes every plain step first: compiling torch's would cost start-up and serve none."""
    config = tiny_config(max_position_embeddings=128)
    without, _ = greedy_run_with(random_model(config, seed=9), native_kernels=False)
    with caplog.at_level("INFO", logger="rivulet.engine"):
        tokens, runner = greedy_run_with(random_model(config, seed=9), compile_decode=True)
    assert runner.compiled is None and runner.exported is None
    assert "RIVULET_COMPILE: not compiled" in caplog.text
    assert runner.native_step.batched_steps == 7 and tokens == without

"""The one-row decode step in C (models/native_step.py): the logits and cache writes of ``Llama.decode`` for
one row, in either weight layout, reading the model's own tensors; and the runner's batch-1 steps go
through it with the same tokens."""
from __future__ import annotations

import pytest
import torch

from models import native_build, native_step
from models.config import LlamaConfig
from models.llama import Llama
from tests.models.support import greedy_run_with, random_model, tiny_config

pytestmark = pytest.mark.skipif(native_build.load() is None, reason="no C compiler for the native kernels")


def prepared(config: LlamaConfig, transposed: bool, seed: int = 5) -> Llama:
    """A model laid out as a runner lays it out, its cache row 0 holding a 9-token prompt."""
    model = random_model(config, seed=seed)
    model.setup_cache(3, config.max_position_embeddings)
    model.fuse_projections()
    model.lay_out_for_cpu(pack=False, transposed=transposed)
    with torch.inference_mode():
        model.prefill(torch.arange(3, 12).unsqueeze(0), torch.tensor([0]), torch.tensor([9]))
    return model


CONFIGS = {
    "grouped": tiny_config(),  # 4 query heads over 2 key/value heads
    "tied, head_dim 32": tiny_config(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),
    "one kv head, head_dim 8": tiny_config(num_attention_heads=8, num_key_value_heads=1),
    "head_dim 64": tiny_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
    "head_dim 128": tiny_config(hidden_size=256, num_attention_heads=2, num_key_value_heads=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.inference_mode()
def test_a_step_gives_the_logits_and_cache_writes_of_the_torch_step(name):
    model = prepared(CONFIGS[name], transposed=False)
    step = native_step.bind(model)
    caches = [layer.self_attn.cache for layer in model.model.layers]
    for token, position in ((7, 9), (200, 10), (13, 11), (21, 100)):  # 100: attention past one block of 64
        before = [(c.k.clone(), c.v.clone()) for c in caches]
        native = step(token, position)
        written = [(c.k.clone(), c.v.clone()) for c in caches]
        for cache, (k, v) in zip(caches, before):
            cache.k.copy_(k)
            cache.v.copy_(v)
        expected = model.decode(torch.tensor([token]), torch.tensor([position]), position + 1, ragged=False)
        torch.testing.assert_close(native, expected, rtol=1e-5, atol=1e-5)
        for cache, (k, v), (k_native, v_native) in zip(caches, before, written):
            torch.testing.assert_close(k_native, cache.k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v_native, cache.v, rtol=1e-5, atol=1e-5)
            others = torch.ones(k.shape[:3], dtype=torch.bool)
            others[0, :, position] = False  # only row 0's new position is written
            assert torch.equal(k_native[others], k[others]) and torch.equal(v_native[others], v[others])


@torch.inference_mode()
def test_a_weight_changed_in_place_is_read_by_the_next_step():
    model = prepared(tiny_config(), transposed=False)
    step = native_step.bind(model)
    model.model.layers[1].mlp.down_proj.weight.mul_(3)
    model.lm_head.weight.mul_(-1)
    native = step(7, 9)
    expected = model.decode(torch.tensor([7]), torch.tensor([9]), 10, ragged=False)
    torch.testing.assert_close(native, expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_token_or_position_out_of_range_raises_and_writes_nothing():
    model = prepared(tiny_config(max_position_embeddings=16), transposed=False)
    step = native_step.bind(model)
    caches = [layer.self_attn.cache for layer in model.model.layers]
    before = [c.k.clone() for c in caches]
    for token, position in ((model.config.vocab_size, 9), (-1, 9), (5, 16), (5, -1)):
        with pytest.raises(ValueError):
            step(token, position)
    assert all(torch.equal(c.k, k) for c, k in zip(caches, before))
    assert step.serves_rows([15, 0]) and not step.serves_rows([16]) and not step.serves_rows([0] * 4)
    assert not step.serves_rows([])


def test_weights_stored_transposed_are_not_bound_and_torch_serves(caplog):
    """Only eager runners without the native step lay weights out transposed; handed such a model, the
    step is not bound (logged), rather than reading the weights in the wrong order."""
    assert native_step.bind(prepared(tiny_config(), transposed=True)) is None
    assert "rows are not contiguous" in caplog.text


def test_what_it_does_not_take():
    assert not native_step.takes(random_model(tiny_config(), seed=1))  # no cache, projections not fused
    model = prepared(tiny_config(), transposed=False).to(torch.bfloat16)
    assert not native_step.takes(model)


def test_the_runners_one_row_steps_go_through_it_with_the_same_tokens():
    config = tiny_config(max_position_embeddings=128)
    without, _ = greedy_run_with(random_model(config, seed=9), native_kernels=False)
    tokens, runner = greedy_run_with(random_model(config, seed=9))
    assert runner.native_step is not None
    assert runner.native_step.steps == 5  # the last request decodes alone for five steps (greedy_run_with)
    assert tokens == without

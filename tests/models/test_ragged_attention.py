"""The native decode attention (models/ragged_attention.py): each row over its own keys, as SDPA's masked
attention computes it, never reading past a row's length; and the fallback where it cannot be built."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from models import native_build, ragged_attention
from models import runner as runner_module
from models.config import LlamaConfig
from models.llama import Llama
from tests.models.support import greedy_run_with, random_model, tiny_config

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler to build the kernel")


@pytest.fixture(scope="module")
def kernel() -> ragged_attention.RaggedAttention:
    loaded = ragged_attention.load()
    assert loaded is not None, native_build.load_error
    return loaded


def masked_reference(query, keys, values, lengths):
    """SDPA over the longest row's keys, each row masked to its own: what decode did before the kernel."""
    longest = int(lengths.max())
    positions = torch.arange(longest)
    mask = torch.where(positions[None] >= lengths[:, None], float("-inf"), 0.0)[:, None, None, :]
    return F.scaled_dot_product_attention(query, keys[:query.shape[0], :, :longest],
                                          values[:query.shape[0], :, :longest], attn_mask=mask,
                                          enable_gqa=keys.shape[1] != query.shape[1])


@pytest.mark.parametrize("sharpness", [4.0, 40.0])  # 40: most weights below exp(-87), where exp8 clamps
@pytest.mark.parametrize("heads, kv_heads, dim", [(8, 8, 64), (8, 2, 64), (4, 4, 128), (6, 3, 40)])
def test_each_row_attends_over_its_own_keys_as_masked_sdpa_does(kernel, heads, kv_heads, dim, sharpness):
    generator = torch.Generator().manual_seed(heads * dim)
    rows, positions = 7, 300
    keys = torch.randn(rows + 2, kv_heads, positions, dim, generator=generator)
    values = torch.randn(rows + 2, kv_heads, positions, dim, generator=generator)
    # Large queries: sharp softmaxes, whose maximum moves between blocks of 64 keys (the online rescale).
    query = sharpness * torch.randn(rows, heads, 1, dim, generator=generator)
    lengths = torch.tensor([1, 2, 63, 64, 65, 200, 129])
    out = kernel(query, keys, values, lengths)
    # Scores of a few hundred carry fp32 rounding of ~1e-5 each whatever the order of summing (the kernel
    # sums a dot product in eight lanes, SDPA otherwise), and a softmax weight's relative error is that.
    tolerance = 1e-5 * sharpness / 4
    torch.testing.assert_close(out, masked_reference(query, keys, values, lengths), rtol=tolerance, atol=tolerance)


def test_keys_past_a_rows_length_are_never_read(kernel):
    rows, positions = 4, 96
    keys = torch.randn(rows, 2, positions, 64)
    values = torch.randn(rows, 2, positions, 64)
    lengths = torch.tensor([5, 33, 64, 80])
    for row, length in enumerate(lengths.tolist()):  # what lies past each row's keys: poison
        keys[row, :, length:] = float("nan")
        values[row, :, length:] = float("nan")
    out = kernel(torch.randn(rows, 4, 1, 64), keys, values, lengths)
    assert torch.isfinite(out).all()


def test_a_length_past_the_cache_is_clamped_to_it(kernel):
    keys, values = torch.randn(2, 1, 16, 64), torch.randn(2, 1, 16, 64)
    query = torch.randn(2, 1, 1, 64)
    out = kernel(query, keys, values, torch.tensor([16, 10_000]))
    torch.testing.assert_close(out, masked_reference(query, keys, values, torch.tensor([16, 16])))


def test_one_thread_and_two_agree(kernel):
    keys, values = torch.randn(16, 8, 128, 64), torch.randn(16, 8, 128, 64)
    query, lengths = torch.randn(16, 8, 1, 64), torch.randint(1, 129, (16,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(query, keys, values, lengths)
        torch.set_num_threads(2)
        two = kernel(query, keys, values, lengths)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each (row, head) is one thread's work, summed in one order


def test_shapes_it_does_not_take():
    cpu = torch.device("cpu")
    assert ragged_attention.RaggedAttention.takes(32, 4, 64, torch.float32, cpu)
    assert not ragged_attention.RaggedAttention.takes(32, 1, 64, torch.float32, cpu)  # 32 heads a group
    assert not ragged_attention.RaggedAttention.takes(8, 8, 512, torch.float32, cpu)
    assert not ragged_attention.RaggedAttention.takes(8, 8, 64, torch.bfloat16, cpu)
    assert not ragged_attention.RaggedAttention.takes(8, 3, 64, torch.float32, cpu)


def test_a_call_it_cannot_serve_raises_instead_of_reading_memory(kernel):
    keys, values = torch.randn(2, 1, 16, 64), torch.randn(2, 1, 16, 64)
    with pytest.raises(ValueError):
        kernel(torch.randn(3, 1, 1, 64), keys, values, torch.tensor([1, 2, 3]))  # more rows than the cache
    with pytest.raises(ValueError):
        kernel(torch.randn(2, 1, 1, 64), keys, values, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError):
        kernel(torch.randn(2, 32, 1, 64), keys, values, torch.tensor([1, 2]))  # a group of 32 heads
    half = (keys.to(torch.bfloat16), values.to(torch.bfloat16))
    with pytest.raises(ValueError):  # the C side reads floats: half the bytes would be read as twice as many
        kernel(torch.randn(2, 1, 1, 64, dtype=torch.bfloat16), *half, torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        kernel(torch.randn(2, 1, 1, 128), keys, values, torch.tensor([1, 2]))  # wider queries than keys
    with pytest.raises(ValueError):
        kernel(torch.randn(2, 1, 3, 64), keys, values, torch.tensor([1, 2]))  # three queries a row


def small_llama(kv_heads: int = 2) -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    return Llama(config).init_weights().eval()


def prefill_rows(model: Llama, lengths: list[int]) -> None:
    generator = torch.Generator().manual_seed(1)
    for row, length in enumerate(lengths):
        tokens = torch.randint(0, 97, (1, length), generator=generator)
        model.prefill(tokens, torch.tensor([row]), torch.tensor([length]))


@torch.inference_mode()
def test_a_ragged_decode_step_through_the_kernel_equals_the_masked_one(kernel):
    lengths = [3, 70, 12, 140, 1]
    model = small_llama()
    model.setup_cache(6, 256)
    prefill_rows(model, lengths)
    tokens, positions = torch.tensor([5, 6, 7, 8, 9]), torch.tensor(lengths)
    masked = model.decode(tokens, positions, max(lengths) + 1, ragged=True)
    masked_cache = [layer.self_attn.cache.k.clone() for layer in model.model.layers]
    assert model.use_native_attention()
    native = model.decode(tokens, positions, max(lengths) + 1, ragged=True)  # rewrites the same slots
    torch.testing.assert_close(native, masked, rtol=1e-5, atol=1e-5)
    for layer, before in zip(model.model.layers, masked_cache):  # the same slots written, nothing else
        torch.testing.assert_close(layer.self_attn.cache.k, before, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_step_with_a_prompts_chunk_through_the_kernel_equals_the_masked_one(kernel):
    lengths = [9, 40, 2]
    model = small_llama()
    model.setup_cache(4, 256)
    prefill_rows(model, lengths)
    chunk_tokens = torch.arange(10, 26)
    model.prefill_chunk(torch.arange(30, 62), row=3, start=0)
    args = (torch.tensor([1, 2, 3]), torch.tensor(lengths), max(lengths) + 1, True, chunk_tokens, 3, 32)
    masked = model.decode_with_chunk(*args)
    assert model.use_native_attention()
    native = model.decode_with_chunk(*args)
    for a, b in zip(native, masked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_runner_decodes_the_same_tokens_with_the_kernel_and_plans_no_lone_rows(kernel, monkeypatch):
    without, runner_off = greedy_run_with(random_model(tiny_config(), seed=3), native_kernels=False)
    assert not runner_off.model.native_attention
    planned = []
    real_plan = runner_module.plan_decode_attention
    monkeypatch.setattr("models.runner.plan_decode_attention",
                        lambda lengths: planned.append(lengths) or real_plan(lengths))
    with_kernel, runner = greedy_run_with(random_model(tiny_config(), seed=3))
    assert runner.model.native_attention
    assert with_kernel == without
    assert planned == []  # each row attends over its own keys: nothing to plan


def test_without_a_kernel_the_model_attends_through_sdpa(monkeypatch):
    monkeypatch.setattr(ragged_attention, "_loaded", None)
    monkeypatch.setattr(native_build, "_library", None)
    monkeypatch.setattr(native_build, "load_error", None)
    monkeypatch.setattr(native_build, "build", lambda cache_dir=None: (_ for _ in ()).throw(
        RuntimeError("no C compiler (cc, gcc or $CC)")))
    monkeypatch.setattr(native_build, "prebuilt_for_this_cpu", lambda directory: None)  # nor a prebuilt one
    model = small_llama()
    model.setup_cache(3, 64)
    assert not model.use_native_attention()
    assert native_build.load_error == "RuntimeError: no C compiler (cc, gcc or $CC)"
    prefill_rows(model, [4, 9])
    with torch.inference_mode():
        logits = model.decode(torch.tensor([1, 2]), torch.tensor([4, 9]), 10, ragged=True)
    assert torch.isfinite(logits).all()

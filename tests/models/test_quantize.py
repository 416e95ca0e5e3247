"""Weight-only int8 (RIVULET_QUANT=int8, models/quantize.py): the rows and scales; every projection and the
LM head quantized with the fp32 weights holding what the int8 rows stand for; the native step's products
read the int8 rows (the same bits as the fp32 product over the dequantized weights, batched), and every
path gives the same tokens."""
from __future__ import annotations

import pytest
import torch

from models import cpu_weights, native_build, native_step
from models.quantize import INT8_MAX, Int8Rows, int8_bytes, quantize_model, quantize_rows
from models.runner import LlamaRunner
from tests.models.support import greedy_run_with, native_product, prepared, random_model, tiny_config

native = pytest.mark.skipif(native_build.load() is None, reason="no C compiler for the native kernels")


def test_rows_round_to_the_nearest_step_of_their_own_scale():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(9, 70, generator=generator) * torch.logspace(-3, 1, 9).unsqueeze(1)  # rows far apart
    rows = quantize_rows(weight)
    assert rows.values.dtype == torch.int8 and rows.values.shape == (9, 70) and rows.scales.shape == (9,)
    torch.testing.assert_close(rows.scales, weight.abs().amax(dim=1) / INT8_MAX)
    assert bool((rows.values.abs().amax(dim=1) == INT8_MAX).all())  # each row's largest weight uses the range
    error = (rows.dequantized() - weight).abs()
    assert bool((error <= rows.scales.unsqueeze(1) * 0.5001).all())


def test_a_row_of_zeros_stays_zeros_and_a_vector_is_refused():
    weight = torch.zeros(3, 8)
    weight[1] = torch.tensor([-127.0, -64, -1, 0, 1, 2, 100, 127]) * 0.25  # whole steps of the scale 0.25
    rows = quantize_rows(weight)
    assert rows.scales[0] == 0 and rows.scales[2] == 0 and not bool(rows.values[0].any())
    assert torch.equal(rows.dequantized()[0], torch.zeros(8))
    assert torch.equal(rows.dequantized()[1], weight[1])  # whole steps are exact
    with pytest.raises(ValueError, match="matrix"):
        quantize_rows(torch.ones(4))


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_model_keeps_int8_rows_and_overwrites_the_weights_with_their_values(tied):
    model = random_model(tiny_config(tie_word_embeddings=tied), seed=3)
    original = model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="fused"):
        quantize_model(model)
    model.fuse_projections()
    made = quantize_model(model)
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    pairs = [(attention.qkv_weight, attention.qkv_int8), (attention.o_proj.weight, attention.o_proj.int8),
             (mlp.gate_up_weight, mlp.gate_up_int8), (mlp.down_proj.weight, mlp.down_proj.int8),
             (model.lm_head.weight, model.lm_head.int8)]
    for weight, rows in pairs:
        assert isinstance(rows, Int8Rows) and torch.equal(weight, rows.dequantized())
    # The fused matrix's views (the state dict's keys) see the same values.
    q_rows = attention.q_proj.weight.shape[0]
    assert torch.equal(attention.q_proj.weight, attention.qkv_int8.dequantized()[:q_rows])
    assert not torch.equal(model.lm_head.weight, original)
    assert torch.equal(model.model.embed_tokens.weight, model.lm_head.weight) == tied
    assert made == sum(rows.values.numel() for layer in model.model.layers for rows in (
        layer.self_attn.qkv_int8, layer.self_attn.o_proj.int8, layer.mlp.gate_up_int8, layer.mlp.down_proj.int8)
    ) + model.lm_head.int8.values.numel()


@native
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 40])
@pytest.mark.parametrize("out_features, in_features", [(6, 16), (13, 7), (50, 64), (7, 300)])
def test_the_int8_product_is_the_fp32_product_over_the_dequantized_weights(rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * 100 + out_features)
    int8 = quantize_rows(torch.randn(out_features, in_features, generator=generator))
    x = torch.randn(rows, in_features, generator=generator)
    dequantized = int8.dequantized()
    expected = native_product(dequantized, x, None)
    # What it reads: int8 rows only. The fp32 matrix it is handed is garbage, and the result is the same bits.
    garbage = torch.full_like(dequantized, float("nan"))
    assert torch.equal(native_product(garbage, x, int8), expected)
    torch.testing.assert_close(expected, x @ dequantized.T, rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("batch", [1, 5, 19])
@torch.inference_mode()
def test_the_native_step_reads_the_int8_rows_and_gives_torchs_logits(batch):
    config = tiny_config(hidden_size=64, intermediate_size=160)
    model = prepared(config, rows=batch, seed=4, quantized=True)
    step = native_step.bind(model)
    assert step.quantized
    tokens = [(13 * row + 2) % config.vocab_size for row in range(batch)]
    positions = [3 + row % 10 for row in range(batch)]
    before = [(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone()) for layer in model.model.layers]
    expected = model.decode(torch.tensor(tokens), torch.tensor(positions), max(positions) + 1, ragged=True)
    for layer, (k, v) in zip(model.model.layers, before):
        layer.self_attn.cache.k.copy_(k)
        layer.self_attn.cache.v.copy_(v)
    # The fp32 weights zeroed under the step: it must read the int8 rows, not them.
    for weight in [model.lm_head.weight] + [w for layer in model.model.layers for w in (
            layer.self_attn.qkv_weight, layer.self_attn.o_proj.weight, layer.mlp.gate_up_weight,
            layer.mlp.down_proj.weight)]:
        weight.zero_()
    native_logits = step(tokens[0], positions[0]) if batch == 1 else step.rows(tokens, positions)
    torch.testing.assert_close(native_logits, expected, rtol=1e-4, atol=1e-4)


@native
@pytest.mark.parametrize("batch", [1, 3, 9])
@torch.inference_mode()
def test_a_native_int8_step_is_the_native_fp32_step_over_the_dequantized_weights(batch):
    """Every product widens an int8 weight and scales it before its multiply-add, as the fp32 copy holds
    it: the whole step gives the same bits as the fp32 step over that copy."""
    model = prepared(tiny_config(hidden_size=80, intermediate_size=200), rows=batch, seed=6, quantized=True)
    int8_step = native_step.bind(model)
    tokens, positions = [(11 * row + 3) % 64 for row in range(batch)], [4 + row % 10 for row in range(batch)]
    caches = [(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone()) for layer in model.model.layers]
    quantized = int8_step(tokens[0], positions[0]) if batch == 1 else int8_step.rows(tokens, positions)
    for layer, (k, v) in zip(model.model.layers, caches):
        layer.self_attn.cache.k.copy_(k)
        layer.self_attn.cache.v.copy_(v)
    for module in [model.lm_head] + [m for layer in model.model.layers for m in (
            layer.self_attn.o_proj, layer.mlp.down_proj)]:
        module.int8 = None
    for layer in model.model.layers:
        layer.self_attn.qkv_int8 = layer.mlp.gate_up_int8 = None
    fp32_step = native_step.bind(model)
    assert int8_step.quantized and not fp32_step.quantized
    dequantized = fp32_step(tokens[0], positions[0]) if batch == 1 else fp32_step.rows(tokens, positions)
    assert torch.equal(quantized, dequantized)


@native
def test_every_path_gives_an_int8_model_the_same_tokens(caplog):
    """The runner quantizes before it lays the weights out: torch's steps over the dequantized fp32 copy
    (native kernels off) and the native products over the int8 rows alone (prompts, batched steps, one-row
    steps) give the same greedy tokens, which are not the fp32 model's."""
    config = tiny_config(max_position_embeddings=128)
    fp32, _ = greedy_run_with(random_model(config, seed=9))
    through_torch, torch_runner = greedy_run_with(random_model(config, seed=9), native_kernels=False, quant="int8")
    assert torch_runner.native_step is None and "outputs are the int8 model's" in caplog.text
    with caplog.at_level("INFO", logger="rivulet.engine"):
        tokens, runner = greedy_run_with(random_model(config, seed=9), quant="int8")
    assert runner.native_step.quantized and "MiB of int8 weights serve every product" in caplog.text
    assert runner.native_step.batched_steps == 7 and runner.native_step.steps == 5
    assert tokens == through_torch
    assert tokens != fp32  # random weights, far from trained ones: int8 moves some greedy choices


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="int4"):
        greedy_run_with(random_model(tiny_config(), seed=9), quant="int4")


def test_the_kv_cache_is_sized_around_the_int8_rows(tiny_checkpoint, monkeypatch):
    """The int8 rows are made after the free memory is read: the cache must leave them their room."""
    from models import llm_backend, memory
    from models.checkpoint import load_model
    from models.memory import kv_cache_bytes

    per_row = kv_cache_bytes(tiny_config(), 1, 128, torch.float32)
    made = int8_bytes(load_model(tiny_checkpoint, torch.device("cpu")))
    assert made > 0
    # Room for exactly two rows' cache plus half the int8 rows: two rows without them, one with.
    free = int(2 * per_row / memory.CACHE_SHARE) + made // 2
    monkeypatch.setattr(llm_backend, "free_bytes", lambda device: free)
    monkeypatch.setattr(llm_backend, "file_backed_bytes", lambda tensors: 0)  # the int8 rows' room alone
    batches = {}
    for quant in ("none", "int8"):
        backend = llm_backend.LlamaBackend(tiny_checkpoint, torch.device("cpu"), max_batch=4, packed_weights=False,
                                           quant=quant)
        backend.load()
        batches[quant] = backend.runner.max_batch
    assert batches == {"none": 2, "int8": 1}


@pytest.mark.skipif(not cpu_weights.packing_available(), reason="no oneDNN packing in this torch")
@pytest.mark.parametrize("native_kernels", [True, False])
def test_the_backend_packs_int8_weights_only_where_the_native_step_does_not_serve(tiny_checkpoint, native_kernels):
    """Where it serves, the fp32 weights are released and nothing is packed; where it does not, torch's
    batched steps multiply the dequantized weights, packed as fp32 weights are."""
    from models import llm_backend

    backend = llm_backend.LlamaBackend(tiny_checkpoint, torch.device("cpu"), max_batch=2, quant="int8",
                                       native_kernels=native_kernels)
    backend.load()
    native_serves = backend.runner.native_step is not None
    assert native_serves == (native_kernels and native_build.load() is not None)
    assert (backend.runner.model.lm_head.packed is None) == native_serves


@native
@pytest.mark.parametrize("tied", [False, True])
@torch.inference_mode()
def test_where_the_native_step_serves_only_the_int8_rows_are_kept_and_products_read_them(tied, caplog):
    config = tiny_config(tie_word_embeddings=tied, max_position_embeddings=128)
    reference = random_model(config, seed=12)
    reference.fuse_projections()
    quantize_model(reference)  # the fp32 copy of what the int8 rows stand for
    with caplog.at_level("INFO", logger="rivulet.engine"):
        runner = LlamaRunner(random_model(config, seed=12), max_batch=2, quant="int8")
    model = runner.model
    released = [layer.self_attn.qkv_weight for layer in model.model.layers] + [
        m.weight for layer in model.model.layers for m in (layer.self_attn.q_proj, layer.self_attn.o_proj,
                                                            layer.mlp.gate_proj, layer.mlp.down_proj)]
    assert all(weight.numel() == 0 for weight in released)
    assert model.model.layers[0].self_attn.qkv_packed is None and model.lm_head.packed is None
    assert (model.lm_head.weight.numel() == 0) != tied  # a tied head is the embedding: kept
    assert "MiB of fp32 weights released" in caplog.text
    # A prompt through the int8 products: the fp32 copy's logits, up to the order of the sums.
    prompt = torch.tensor([[1, 5, 9, 2, 7, 3, 3, 8]])
    torch.testing.assert_close(model(prompt), reference(prompt), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fp32 inputs"):
        model.lm_head.int8_product(torch.ones(2, config.hidden_size, dtype=torch.float64))

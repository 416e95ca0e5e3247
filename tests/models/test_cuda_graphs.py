"""RIVULET_CUDA_GRAPHS: the static-shape decode step (padding, spare positions, grouped attention) on a CPU,
with nothing captured, and the captured graphs on CUDA where there is one."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from models import cuda_graphs
from models.api import GenerationRequest, SamplingParams
from models.cuda_graphs import GraphedDecode, batch_buckets, bucket_for, key_buckets
from models.llama import Llama, grouped_attention
from models.runner import LlamaRunner
from models.sequence import Sequence
from tests.models.support import random_model, tiny_config

CONTEXT = 300  # past the first key bucket (128), so steps pick among three: 128, 256, 300


@pytest.fixture(scope="module")
def model() -> Llama:
    return random_model(tiny_config(max_position_embeddings=CONTEXT), seed=11)


def sequence(name: str, prompt: list[int]) -> Sequence:
    params = SamplingParams(max_tokens=999, temperature=0.0, ignore_eos=True)
    return Sequence(GenerationRequest(name, prompt, params, 1e12), None, set(), CONTEXT)


def prompt(length: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, 400, (length - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def caches(model: Llama) -> list[torch.Tensor]:
    """Every layer's keys and values, copied."""
    return [t.clone() for layer in model.model.layers for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)]


def restore(model: Llama, saved: list[torch.Tensor]) -> None:
    tensors = [t for layer in model.model.layers for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)]
    for tensor, copy in zip(tensors, saved):
        tensor.copy_(copy)


# --- buckets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch, expected", [
    (1, (1,)),
    (3, (1, 2, 3)),
    (4, (1, 2, 4)),
    (8, (1, 2, 4, 8)),
    (20, (1, 2, 4, 8, 16, 20)),
    (32, (1, 2, 4, 8, 16, 24, 32)),
])
def test_batch_buckets_end_at_the_max_batch(max_batch, expected):
    assert batch_buckets(max_batch) == expected


@pytest.mark.parametrize("max_seq, expected", [
    (100, (100,)),
    (128, (128,)),
    (300, (128, 256, 300)),
    (1024, (128, 256, 384, 512, 640, 768, 896, 1024)),
    (1500, (128, 256, 384, 512, 640, 768, 896, 1024, 1500)),
    (4096, (128, 256, 384, 512, 640, 768, 896, 1024, 2048, 4096)),
    (5000, (128, 256, 384, 512, 640, 768, 896, 1024, 2048, 4096, 5000)),
])
def test_key_buckets_grow_by_128_then_double_and_end_at_the_context(max_seq, expected):
    assert key_buckets(max_seq) == expected


def test_a_step_takes_the_smallest_bucket_that_holds_it():
    buckets = (1, 2, 4, 8, 16, 20)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8, 9, 17, 20)] == [1, 2, 4, 4, 8, 8, 16, 20, 20]
    assert bucket_for(129, key_buckets(300)) == 256 and bucket_for(300, key_buckets(300)) == 300
    with pytest.raises(ValueError):
        bucket_for(21, buckets)


# --- the grouped attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_attention_equals_sdpa_with_grouped_heads(kv_heads):
    torch.manual_seed(0)
    batch, heads, head_dim, keys = 3, 4, 8, 10
    q = torch.randn(batch, heads, 1, head_dim)
    k, v = torch.randn(batch, kv_heads, keys, head_dim), torch.randn(batch, kv_heads, keys, head_dim)
    positions = torch.tensor([9, 2, 5])
    mask = torch.where(torch.arange(keys)[None, :] > positions[:, None], float("-inf"), 0.0)[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
    torch.testing.assert_close(grouped_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
    # The grouping is HF's: key/value head j serves query heads j*G..(j+1)*G-1 (a query head given another
    # group's keys would differ).
    if kv_heads == 2:
        swapped = torch.cat([q[:, 2:], q[:, :2]], dim=1)
        assert not torch.allclose(grouped_attention(swapped, k, v, mask), expected[:, [2, 3, 0, 1]])


# --- the static-shape step, eager ------------------------------------------------------------------------


def prefilled(model: Llama, lengths: list[int], max_batch: int = 6) -> GraphedDecode:
    """``model``'s cache set up with a spare position, rows 0..len(lengths)-1 prefilled. -> the step, uncaptured"""
    model.setup_cache(max_batch, CONTEXT + cuda_graphs.SPARE_POSITIONS)
    prompts = [prompt(n, seed=i) + [0] * (max(lengths) - n) for i, n in enumerate(lengths)]
    model.prefill(torch.tensor(prompts), torch.arange(len(lengths)), torch.tensor(lengths))
    return GraphedDecode(model, max_batch, CONTEXT, capture=False)


def test_the_static_step_gives_the_eager_decode_logits_padded_to_a_larger_bucket(model):
    with torch.inference_mode():
        graphed = prefilled(model, [140, 7, 12])  # 3 rows -> batch bucket 4, 141 keys -> key bucket 256
        tokens, positions = [5, 6, 7], [140, 7, 12]
        before = caches(model)
        eager = model.decode(torch.tensor(tokens), torch.tensor(positions))
        eager_cache = caches(model)
        restore(model, before)
        static = graphed.step(tokens, positions)
    assert static.shape == (3, model.config.vocab_size) and graphed.steps == 1
    assert torch.isfinite(graphed.logits[3]).all()  # the padding row's query (position 0) saw a key
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    for after, expected in zip(caches(model), eager_cache):  # the real rows' new keys and values, where eager's are
        torch.testing.assert_close(after[:3, :, :CONTEXT], expected[:3, :, :CONTEXT], rtol=1e-5, atol=1e-6)


def test_every_bucket_serves_with_the_padding_rows_dropped(model):
    """The largest batch bucket and the last key bucket, and a batch that fills its bucket exactly."""
    with torch.inference_mode():
        graphed = prefilled(model, [299, 3, 40, 8, 9, 20])
        for rows in (6, 5):
            tokens, positions = [9] * rows, [299, 3, 40, 8, 9, 20][:rows]
            before = caches(model)
            eager = model.decode(torch.tensor(tokens), torch.tensor(positions))
            restore(model, before)
            torch.testing.assert_close(graphed.step(tokens, positions), eager, rtol=1e-5, atol=1e-5)


def test_the_static_step_reads_nothing_back_to_the_host(model):
    """A CUDA graph cannot hold a step that reads a value on the host (``.item()``, a shape taken from a
    value): under fake tensors such a read raises, as it does in the eager step that derives its key count."""
    with torch.inference_mode():
        graphed = prefilled(model, [20, 7, 12])
        before = caches(model)
        with FakeTensorMode(allow_non_fake_inputs=True):
            graphed._static_step(4, graphed.key_buckets[0])  # what a graph captures, whole
            zeros = torch.zeros(4, dtype=torch.long)
            with pytest.raises(DataDependentOutputException):
                model.decode(zeros, zeros)  # ``int(positions.max())``: the check can fail
    assert all(torch.equal(a, b) for a, b in zip(caches(model), before))  # fake tensors wrote nothing real


def test_a_cache_without_a_spare_position_is_refused(model):
    model.setup_cache(2, CONTEXT)
    with pytest.raises(ValueError, match="spare position"):
        GraphedDecode(model, 2, CONTEXT, capture=False)


# --- in the runner ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("running", [3, 5])
def test_padding_rows_leave_every_real_cache_row_untouched(model, running):
    """Rows past the batch may be in use: the chunk row (the last) holds the first chunk of a long prompt.
    A step of 3 rows pads to 4 (a free row pads); of 5, to 6 (the chunk row pads). Only the running rows'
    new positions and the padding rows' spare positions change."""
    runner = LlamaRunner(model, max_batch=6, max_seq=CONTEXT, uncaptured_graphs=True)
    with torch.inference_mode():
        for result in runner.prefill([sequence(f"r{i}", prompt(5 + 3 * i, seed=i)) for i in range(running)]):
            result.seq.output_ids.append(result.token)
        assert runner.prefill_chunk(sequence("long", prompt(200, seed=9)), 64) is None
        assert runner.chunk_row == 5 and runner.chunked == 64
        positions = list(runner.cached)
        before = caches(model)
        runner.decode()
    assert runner.graphed.steps == 1
    padded = bucket_for(running, runner.graphed.batch_buckets)
    for after, old in zip(caches(model), before):
        changed = (after != old).any(dim=-1).any(dim=1)  # [rows, positions]: any head, any dimension
        expected = torch.zeros_like(changed)
        expected[range(running), positions] = True
        expected[running:padded, CONTEXT] = True
        assert torch.equal(changed, expected)


def run_scenario(model: Llama, **runner_options) -> tuple[list[list[int]], LlamaRunner]:
    """Greedy requests through a runner of 6 rows (batch buckets 1, 2, 4, 6): three of different lengths
    (padded to 4), then two join and a long prompt is prefilled in chunks: one step with its chunk (eager),
    then plain steps of 5 rows while it waits in the chunk row (padded to 6: the chunk row pads). Two leave,
    the long prompt completes and joins (4 rows), one more leaves (3, padded to 4).
    -> (each request's tokens, the runner)"""
    runner = LlamaRunner(model, max_batch=6, max_seq=CONTEXT, **runner_options)
    seqs = [sequence(f"r{i}", prompt(n, seed=i)) for i, n in enumerate([3, 140, 9, 6, 20])]
    long = sequence("long", prompt(150, seed=7))

    def take(results) -> None:
        for result in results:
            assert result.error is None
            result.seq.output_ids.append(result.token)

    with torch.inference_mode():
        take(runner.prefill(seqs[:3]))
        for _ in range(3):
            take(runner.decode())
        take(runner.prefill(seqs[3:]))
        take(runner.decode(chunk_of=long, chunk_budget=100))  # its first chunk, eager
        for _ in range(3):
            take(runner.decode())  # the long prompt waits half-done in the chunk row
        runner.release(seqs[0])
        runner.release(seqs[2])
        take(runner.decode(chunk_of=long, chunk_budget=100))  # it completes and joins: 4 rows
        for _ in range(4):
            take(runner.decode())
        runner.release(seqs[1])
        for _ in range(2):
            take(runner.decode())
    return [s.output_ids for s in seqs + [long]], runner


def test_a_runner_with_the_static_step_gives_the_eager_tokens(model):
    eager, plain = run_scenario(model)
    assert plain.graphed is None  # on a CPU the setting builds nothing...
    assert model.model.layers[0].self_attn.cache.k.shape[2] == CONTEXT  # ...and adds no spare position
    static, runner = run_scenario(model, uncaptured_graphs=True)
    assert runner.graphed.error is None and runner.graphed.steps == 12  # every plain step
    assert static == eager
    assert [len(tokens) for tokens in static] == [8, 13, 8, 12, 12, 7]


def test_a_failing_static_step_runs_eager_with_a_warning(model, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    eager, _ = run_scenario(model)
    monkeypatch.setattr(model, "decode_static", broken)
    with caplog.at_level(logging.WARNING, logger="rivulet.engine"):
        fallen_back, runner = run_scenario(model, uncaptured_graphs=True)
    assert runner.graphed.error == "RuntimeError: operation not permitted when stream is capturing"
    assert runner.graphed.steps == 0 and not runner.graphed.serves(1)
    assert caplog.text.count("decode steps run eager from now on") == 1  # once, not every step
    assert fallen_back == eager


def test_graphs_apply_on_cuda_only():
    assert cuda_graphs.graphs_apply(torch.device("cuda:0"), True)
    assert not cuda_graphs.graphs_apply(torch.device("cuda:0"), False)
    assert not cuda_graphs.graphs_apply(torch.device("cpu"), True)


# --- captured, on CUDA -----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
class TestCapturedOnCuda:
    """The graphs themselves: captured at start-up and on first use, replayed, against the eager step."""

    def cuda_model(self, dtype: torch.dtype) -> Llama:
        """As a checkpoint loads: the weights in ``dtype``, the rotary tables in fp32."""
        model = random_model(tiny_config(max_position_embeddings=CONTEXT), seed=11).to("cuda")
        model.model.to(dtype)
        model.lm_head.to(dtype)
        return model

    def test_replayed_steps_match_the_eager_step_in_bf16(self):
        model = self.cuda_model(torch.bfloat16)
        runner = LlamaRunner(model, max_batch=6, max_seq=CONTEXT)
        graphed = runner.graphed
        assert graphed is not None and graphed.capture and graphed.error is None
        assert set(graphed.graphs) == {(batch, 128) for batch in graphed.batch_buckets}  # at start-up
        with torch.inference_mode():
            lengths = [140, 7, 12]
            prompts = [prompt(n, seed=i) + [0] * (140 - n) for i, n in enumerate(lengths)]
            model.prefill(torch.tensor(prompts, device="cuda"), torch.arange(3, device="cuda"),
                          torch.tensor(lengths, device="cuda"))
            for step in range(3):  # the first captures (4 rows, 256 keys), the others replay it
                tokens, positions = [5 + step, 6, 7], [n + step for n in lengths]
                before = caches(model)
                eager = model.decode(torch.tensor(tokens, device="cuda"), torch.tensor(positions, device="cuda"))
                eager_cache = caches(model)
                restore(model, before)
                replayed = graphed.step(tokens, positions).clone()
                assert graphed.error is None and (4, 256) in graphed.graphs
                scale = eager.abs().max().item()
                torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2 * scale)
                for after, expected in zip(caches(model), eager_cache):
                    torch.testing.assert_close(after[:3, :, :CONTEXT], expected[:3, :, :CONTEXT],
                                               rtol=2e-2, atol=2e-2)
        assert graphed.steps == 3

    def test_a_captured_runner_gives_the_eager_tokens_in_fp32(self):
        model = self.cuda_model(torch.float32)
        eager, plain = run_scenario(model, cuda_graphs=False)
        assert plain.graphed is None
        graphed, runner = run_scenario(model)
        assert runner.graphed.error is None and runner.graphed.steps == 12
        assert graphed == eager

"""The model's cached paths (prefill + batched decode over rows of different lengths) against a full
forward pass, and the runner's row bookkeeping when sequences leave mid-batch."""
from __future__ import annotations

import time

import pytest
import torch

from models.api import GenerationRequest, SamplingParams
from models.errors import ContextLengthExceeded, InvalidRequest
from models.runner import LlamaRunner
from models.sequence import Sequence
from tests.models.support import random_model, tiny_config

ATOL = 1e-4  # fp32; the paths differ only in summation order


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(max_position_embeddings=64), seed=1)


def full_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -1]


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    return torch.tensor([p + [0] * (width - len(p)) for p in prompts]), torch.tensor([len(p) for p in prompts])


def test_prefill_then_batched_decode_equals_full_forward(model):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 400, (n,), generator=generator).tolist() for n in (5, 1, 11)]
    with torch.inference_mode():
        model.setup_cache(max_batch=4)
        # Two prompts in one padded pass (rows 0 and 2), one alone (row 1).
        tokens, lengths = padded([prompts[0], prompts[2]])
        logits = model.prefill(tokens, torch.tensor([0, 2]), lengths)
        torch.testing.assert_close(logits[0], full_last_logits(model, prompts[0]), atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[1], full_last_logits(model, prompts[2]), atol=ATOL, rtol=0)
        logits = model.prefill(torch.tensor([prompts[1]]), torch.tensor([1]), torch.tensor([1]))
        torch.testing.assert_close(logits[0], full_last_logits(model, prompts[1]), atol=ATOL, rtol=0)
        prompts = [prompts[0], prompts[1], prompts[2]]  # rows 0, 1, 2
        # Several decode steps; every row at its own position, the mask hiding the others' extra keys.
        for _ in range(6):
            nxt = torch.randint(0, 400, (3,), generator=generator).tolist()
            positions = torch.tensor([len(ids) for ids in prompts])
            logits = model.decode(torch.tensor(nxt), positions)
            for row, token in enumerate(nxt):
                prompts[row].append(token)
                torch.testing.assert_close(logits[row], full_last_logits(model, prompts[row]),
                                           atol=ATOL, rtol=0)


def test_decode_at_the_last_position_of_the_context(model):
    ids = list(range(1, 64))  # 63 tokens: the 64th (the last position) goes through decode
    with torch.inference_mode():
        model.setup_cache(max_batch=1)
        model.prefill(torch.tensor([ids]), torch.tensor([0]), torch.tensor([63]))
        logits = model.decode(torch.tensor([7]), torch.tensor([63]))
    torch.testing.assert_close(logits[0], full_last_logits(model, ids + [7]), atol=ATOL, rtol=0)


class FixedTokens:
    """Stands in for a Tokenizer in Sequence: the runner test needs ids, not text."""

    eos_ids = (2,)

    def decode(self, ids):
        return ""


def sequence(prompt: list[int], max_tokens: int = 50) -> Sequence:
    req = GenerationRequest("r", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                            time.monotonic() + 60)
    return Sequence(req, FixedTokens(), frozenset({2}), max_length=64)


@pytest.mark.parametrize("budget", [4096, 12])  # one padded pass for all, or one pass per prompt
def test_runner_keeps_every_row_exact_when_rows_leave(model, monkeypatch, budget):
    """Prefill rows of different lengths together, then release rows from the middle and the end
    between steps: the moved rows must stay exact."""
    monkeypatch.setattr("models.runner.PREFILL_TOKEN_BUDGET", budget)
    with torch.inference_mode():
        runner = LlamaRunner(model, max_batch=4)
        seqs = [sequence([5 + i] * (3 + 4 * i)) for i in range(4)]
        for result in runner.prefill(seqs):
            assert result.error is None
            assert result.token == int(torch.argmax(full_last_logits(model, result.seq.request.prompt_ids)))
            result.seq.output_ids.append(result.token)
        live = list(seqs)
        for step in range(6):
            if step == 2:
                runner.release(live.pop(1))  # the last row moves into row 1
            if step == 4:
                runner.release(live.pop(0))
            results = runner.decode()
            assert [r.seq for r in results] == sorted(live, key=lambda s: s.row)  # rows 0..B-1 in order
            logits_check = {id(s): full_last_logits(model, s.request.prompt_ids + s.output_ids) for s in live}
            for result in results:
                assert result.error is None
                assert result.token == int(torch.argmax(logits_check[id(result.seq)]))
                result.seq.output_ids.append(result.token)
        assert sorted(s.row for s in live) == list(range(len(live)))


def test_runner_fails_only_the_prompts_that_do_not_fit(model):
    with torch.inference_mode():
        runner = LlamaRunner(model, max_batch=3)
        too_long, empty, fine = sequence(list(range(64))), sequence([]), sequence([1, 2, 3])
        results = runner.prefill([too_long, empty, fine])
        assert isinstance(results[0].error, ContextLengthExceeded)
        assert isinstance(results[1].error, InvalidRequest)
        assert results[2].error is None and results[2].token is not None
        runner.release(too_long)
        runner.release(empty)
        assert runner.rows == [fine] and runner.cached == [3] and fine.row == 0


def test_half_precision_path_runs_with_a_cache_of_the_weights_dtype(tiny_checkpoint):
    """What CUDA gets (bf16 weights, cache and mask), exercised on the CPU."""
    from models.checkpoint import load_model

    with torch.inference_mode():
        half = load_model(tiny_checkpoint, torch.device("cpu"), dtype=torch.bfloat16)
        full = load_model(tiny_checkpoint, torch.device("cpu"))
        runner = LlamaRunner(half, max_batch=2)
        assert half.model.layers[0].self_attn.cache.k.dtype == torch.bfloat16
        seqs = [sequence([1, 2, 3]), sequence([4, 5, 6, 7, 8])]
        for result in runner.prefill(seqs):
            result.seq.output_ids.append(result.token)
        tokens = torch.tensor([s.last_token for s in seqs])
        logits = half.decode(tokens, torch.tensor([3, 5]))
        assert logits.dtype == torch.bfloat16
        for row, seq in enumerate(seqs):
            expected = full(torch.tensor([seq.request.prompt_ids + seq.output_ids]))[0, -1]
            # bf16 keeps about 3 significant digits: here the logits differ by ~2% of their spread. A bound of
            # 5% of the spread (not a fixed 0.05, a third of it) fails on any real mistake in the path.
            error = (logits[row].float() - expected).abs().max()
            assert error <= 0.05 * expected.std(), (error, expected.std())
        assert all(r.error is None for r in runner.decode())


def test_fused_projections_give_the_same_logits_and_keep_the_state_dict():
    """fuse_projections lays q/k/v and gate/up out as one matrix each; the separate weights become views."""
    plain = random_model(tiny_config(max_position_embeddings=64), seed=2)
    fused = random_model(tiny_config(max_position_embeddings=64), seed=2)
    keys = set(fused.state_dict())
    fused.fuse_projections()
    attention, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert set(fused.state_dict()) == keys
    assert attention.k_proj.weight.data_ptr() == attention.qkv_weight[attention.q_proj.weight.shape[0]:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[mlp.gate_proj.weight.shape[0]:].data_ptr()
    tokens = torch.tensor([[1, 9, 44, 7, 300, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(fused(tokens), plain(tokens), atol=ATOL, rtol=0)
        for model in (plain, fused):
            model.setup_cache(max_batch=2)
            model.prefill(tokens.expand(2, -1), torch.tensor([0, 1]), torch.tensor([6, 6]))
        # Both rows at one position: the unmasked path (ragged=False) must equal the masked one.
        step = torch.tensor([5, 6]), torch.tensor([6, 6])
        expected = plain.decode(*step)
        torch.testing.assert_close(fused.decode(*step, ragged=False), expected, atol=ATOL, rtol=0)


def test_runner_sets_the_threads_its_policy_picks_and_reports_each_step(model, monkeypatch):
    calls, recorded = [], []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: calls[-1] if calls else 1)
    with torch.inference_mode():
        runner = LlamaRunner(model, max_batch=12)
        policy = runner.thread_policy
        policy.idle, policy.busy = 3, 1
        monkeypatch.setattr(policy, "record", lambda rows, threads, seconds: recorded.append((rows, threads)))
        few = [sequence([3, 4])]
        for result in runner.prefill(few):  # into an idle runner: batch 1's count
            result.seq.output_ids.append(result.token)
        assert calls == [3]
        runner.decode()
        assert calls == [3] and recorded == [(1, 3)]  # set once, not again at the decode step
        many = [sequence([5, 6]) for _ in range(9)]
        for result in runner.prefill(many):  # one stream running: still its count
            result.seq.output_ids.append(result.token)
        assert calls == [3]
        runner.decode()  # ten streams now: the prior for many is one core less
        assert calls == [3, 1] and recorded[-1] == (10, 1)


def test_a_prompt_prefilled_in_chunks_gives_the_logits_and_cache_of_one_pass():
    model = random_model(tiny_config(max_position_embeddings=128), seed=1)
    model.fuse_projections()
    model.setup_cache(3, 128)
    prompt = torch.randint(3, 400, (50,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = model(prompt[None])[0, -1]
        for start in range(0, 50, 16):  # 16, 16, 16, then 2 tokens, in row 2
            chunked = model.prefill_chunk(prompt[start:start + 16], row=2, start=start)
        model.prefill(prompt[None], torch.tensor([0]), torch.tensor([50]))  # the same prompt in row 0
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    for layer in model.model.layers:
        cache = layer.self_attn.cache
        torch.testing.assert_close(cache.k[2, :, :50], cache.k[0, :, :50])
        torch.testing.assert_close(cache.v[2, :, :50], cache.v[0, :, :50])


@pytest.mark.parametrize("ragged", [False, True])
def test_a_decode_step_with_a_chunk_beside_it_gives_the_logits_and_cache_of_two_passes(ragged):
    """``decode_with_chunk`` (one pass over the weights) against ``decode`` then ``prefill_chunk``."""
    model = random_model(tiny_config(max_position_embeddings=128), seed=2)
    model.fuse_projections()
    prompts = [[1, 9, 8, 7], [1, 5, 6, 7, 8, 9, 10] if ragged else [1, 4, 3, 2]]
    long_prompt = torch.randint(3, 400, (40,), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (False, True):
        model.setup_cache(4, 128)
        with torch.inference_mode():
            tokens, lengths = padded(prompts)
            model.prefill(tokens, torch.tensor([0, 1]), lengths)
            model.prefill_chunk(long_prompt[:16], row=3, start=0)  # the chunk's earlier part, in row 3
            step = (torch.tensor([11, 12]), lengths.clone(), int(lengths.max()) + 1, ragged)
            if fused:
                decoded, chunked = model.decode_with_chunk(*step, long_prompt[16:40], row=3, start=16)
            else:
                decoded = model.decode(*step)
                chunked = model.prefill_chunk(long_prompt[16:40], row=3, start=16)
        caches = [(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone()) for layer in model.model.layers]
        results.append((decoded, chunked, caches))
    (decoded, chunked, caches), (fused_decoded, fused_chunked, fused_caches) = results
    torch.testing.assert_close(fused_decoded, decoded, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused_chunked, chunked, atol=1e-4, rtol=1e-4)
    for (k, v), (fused_k, fused_v) in zip(caches, fused_caches):
        torch.testing.assert_close(fused_k, k, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fused_v, v, atol=1e-5, rtol=1e-4)
    # And the chunk's logits are the whole prompt's (a one-pass forward over its 40 tokens).
    with torch.inference_mode():
        torch.testing.assert_close(fused_chunked, model(long_prompt[None])[0, -1], atol=1e-4, rtol=1e-4)

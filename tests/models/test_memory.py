"""The KV cache's size, RIVULET_MAX_CONTEXT, and the load-time check that the cache fits in memory."""
from __future__ import annotations


import pytest
import torch

from models import llm_backend, memory
from models.config import LlamaConfig
from models.errors import CapacityError, CheckpointError
from models.llm_backend import LlamaBackend
from models.memory import GiB, fitting_batch, kv_cache_bytes
from tests.models.support import RecordingBackend, RecordingSink, generate, request, running_engine, tiny_config

CPU = torch.device("cpu")
# Llama 2 7B: 32 layers, 32 key/value heads of 128.
LLAMA2_7B = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                        max_position_embeddings=4096)


def test_cache_size_of_a_known_model():
    # 2 (keys, values) x 32 layers x 32 heads x 128 x 2 bytes = 0.5 MiB a position.
    assert kv_cache_bytes(LLAMA2_7B, 1, 1, torch.bfloat16) == 512 * 1024
    assert kv_cache_bytes(LLAMA2_7B, 32, 4096, torch.bfloat16) == 64 * GiB
    assert kv_cache_bytes(LLAMA2_7B, 32, 4096, torch.float32) == 128 * GiB
    gqa = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    assert kv_cache_bytes(gqa, 32, 4096, torch.bfloat16) == 16 * GiB


def test_a_cache_that_fits_keeps_the_batch_and_an_unknown_free_size_is_not_checked():
    assert fitting_batch(LLAMA2_7B, 32, 4096, torch.bfloat16, CPU, free=80 * GiB) == 32
    assert fitting_batch(LLAMA2_7B, 32, 4096, torch.bfloat16, CPU, free=None) == 32


def test_a_cache_too_large_for_the_batch_gets_the_most_rows_that_fit():
    # 2 GiB a sequence of 4,096 tokens; 90% of 40 GiB holds 18 of them (as on an 80 GB GPU after 13 GiB
    # of weights, less what others use).
    batch = fitting_batch(LLAMA2_7B, 32, 4096, torch.bfloat16, torch.device("cuda:0"), free=40 * GiB)
    budget = 40 * GiB * memory.CACHE_SHARE
    assert kv_cache_bytes(LLAMA2_7B, batch, 4096, torch.bfloat16) <= budget
    assert kv_cache_bytes(LLAMA2_7B, batch + 1, 4096, torch.bfloat16) > budget
    assert batch == 18


def test_not_even_one_sequence_names_the_context_that_would_fit():
    with pytest.raises(CapacityError) as caught:  # 0.9 GiB: 1,843 positions of 0.5 MiB
        fitting_batch(LLAMA2_7B, 32, 4096, torch.bfloat16, torch.device("cuda:0"), free=GiB)
    message = caught.value.message
    assert "2.00 GiB" in message and "cuda:0" in message and "bfloat16" in message
    assert "RIVULET_MAX_CONTEXT=1843 or less" in message
    with pytest.raises(CapacityError, match="the weights leave no room"):
        fitting_batch(LLAMA2_7B, 32, 4096, torch.bfloat16, CPU, free=1024)


def test_the_spare_positions_of_cuda_graphs_are_counted():
    # 18 rows of 4,096 positions fill 90% of 40 GiB exactly: with a spare position each, 17 fit.
    assert fitting_batch(LLAMA2_7B, 32, 4096, torch.bfloat16, CPU, free=40 * GiB) == 18
    assert fitting_batch(LLAMA2_7B, 32, 4096, torch.bfloat16, CPU, free=40 * GiB, spare_positions=1) == 17
    with pytest.raises(CapacityError, match="RIVULET_MAX_CONTEXT=1842 or less"):  # 1,843 positions, one spare
        fitting_batch(LLAMA2_7B, 32, 4096, torch.bfloat16, CPU, free=GiB, spare_positions=1)


def test_the_cpu_reports_its_free_memory():
    free = memory.free_bytes(CPU)
    assert free is None or free > 0
    if memory.MEMINFO.exists():
        assert free is not None


def test_weights_still_in_the_checkpoint_file_s_mapping_are_counted_once(tiny_checkpoint):
    from models.checkpoint import load_model
    model = load_model(tiny_checkpoint, CPU)
    weight = model.lm_head.weight  # as loaded: a page of the safetensors file's mapping
    if not memory.MAPS.exists():
        pytest.skip("no /proc/self/maps here")
    own_copy = weight.detach().clone()
    size = weight.untyped_storage().nbytes()
    assert memory.file_backed_bytes([weight]) == size
    assert memory.file_backed_bytes([weight, weight[:3], own_copy]) == size  # one storage, once; a copy: none
    assert memory.file_backed_bytes([own_copy, torch.zeros(1000)]) == 0


def test_weights_the_layout_copies_out_of_the_file_leave_the_cache_less_room(tiny_checkpoint, monkeypatch):
    per_row = kv_cache_bytes(tiny_config(), 1, 128, torch.float32)
    monkeypatch.setattr(llm_backend, "free_bytes", lambda device: int(4.5 * per_row / memory.CACHE_SHARE))
    monkeypatch.setattr(llm_backend, "file_backed_bytes", lambda tensors: int(2 * per_row / memory.CACHE_SHARE))
    backend = LlamaBackend(tiny_checkpoint, CPU, max_batch=4, packed_weights=False)
    with torch.inference_mode():
        backend.load()
    assert backend.runner.max_batch == 2


def test_max_context_caps_the_served_context_and_the_cache(tiny_checkpoint):
    backend = LlamaBackend(tiny_checkpoint, CPU, max_batch=2, max_context=32)
    assert backend.context_length == 32
    with torch.inference_mode():
        backend.load()
    assert backend.runner.max_seq == 32
    assert backend.runner.model.model.layers[0].self_attn.cache.k.shape == (2, 2, 32, 16)  # [B, H, S, D]
    assert LlamaBackend(tiny_checkpoint, CPU, max_batch=2).context_length == 128


def test_a_capped_context_ends_generation_at_the_cap(tiny_checkpoint):
    backend = RecordingBackend(tiny_checkpoint, CPU, max_batch=2, max_context=16)
    with running_engine(backend, max_batch=2) as engine:
        sink = generate(engine, [1, 5, 6, 7, 8, 9], max_tokens=100, ignore_eos=True)
    assert sink.finished.reason == "length" and sink.finished.completion_tokens == 16 - 6


def test_max_context_past_the_checkpoint_is_refused_naming_the_setting(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"RIVULET_MAX_CONTEXT=4096 is longer than .*config\.json \(128"):
        LlamaBackend(tiny_checkpoint, CPU, max_batch=1, max_context=4096)


def test_a_short_memory_serves_fewer_sequences_at_once_and_every_request_still_ends(tiny_checkpoint, monkeypatch):
    per_row = kv_cache_bytes(tiny_config(), 1, 128, torch.float32)  # the tiny checkpoint's, fp32 on the CPU
    monkeypatch.setattr(llm_backend, "free_bytes", lambda device: int(2.5 * per_row / memory.CACHE_SHARE))
    monkeypatch.setattr(llm_backend, "file_backed_bytes", lambda tensors: 0)  # the cache's room alone
    backend = RecordingBackend(tiny_checkpoint, CPU, max_batch=4)
    seen_running = []
    execute = backend.execute

    def watched_execute(batch):
        seen_running.append(len(backend.runner.rows) + len(batch.prefill))
        return execute(batch)

    monkeypatch.setattr(backend, "execute", watched_execute)
    with running_engine(backend, max_batch=4) as engine:
        assert backend.runner.max_batch == 2
        sinks = [RecordingSink() for _ in range(5)]
        for sink in sinks:
            engine.submit(request([1, 5, 6], max_tokens=6, ignore_eos=True), sink)
        assert [sink.wait().reason for sink in sinks] == ["length"] * 5
    assert max(seen_running) == 2


def test_no_room_for_one_sequence_kills_the_engine_with_the_advice(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(llm_backend, "free_bytes", lambda device: 1000)  # a tiny machine
    with running_engine(LlamaBackend(tiny_checkpoint, CPU, max_batch=4)) as engine:
        assert engine.state == "dead"
        assert "RIVULET_MAX_CONTEXT" in engine.error and "needs" in engine.error

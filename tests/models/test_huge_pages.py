"""The weights every CPU step streams, held in 2 MiB pages (models/huge_pages.py): moved with their values
and views, the KV cache, small tensors and untied embeddings left where they are, and the same tokens from
every step, native and torch's, fp32 and int8."""
from __future__ import annotations

import pytest
import torch

from models import huge_pages
from tests.models.support import greedy_run_with, random_model, tiny_config

pytestmark = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")

# Projections of a few hundred KiB each, past huge_pages.SMALLEST; norms of 1 KiB.
WIDE = dict(hidden_size=256, intermediate_size=688)


def advised_for_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether the mapping holding ``tensor`` is advised MADV_HUGEPAGE (VmFlags ``hg`` in /proc/self/smaps):
    what the kernel was asked, whether or not a 2 MiB page was free at the time."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(part, 16) for part in first.split("-"))
                inside = start <= address < end
            elif inside and first == "VmFlags:":
                return "hg" in line.split()
    return False


@pytest.mark.parametrize("tied", [False, True])
def test_large_weights_move_with_their_values_and_views_and_the_rest_stays(tied):
    model = random_model(tiny_config(tie_word_embeddings=tied, **WIDE), seed=4)
    model.setup_cache(2, 64)
    model.fuse_projections()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    cache, norm, embeddings = attention.cache.k, model.model.norm.weight, model.model.embed_tokens.weight
    cache_address, norm_address, embeddings_address = cache.data_ptr(), norm.data_ptr(), embeddings.data_ptr()

    moved = huge_pages.hold_in_huge_pages(model)

    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    region = model.lm_head.weight.untyped_storage().data_ptr()
    for weight in (attention.qkv_weight, attention.o_proj.weight, mlp.gate_up_weight, mlp.down_proj.weight,
                   model.lm_head.weight):
        # All in one mapping, advised (whatever torch's allocator did with their old memory).
        assert weight.untyped_storage().data_ptr() == region and advised_for_huge_pages(weight)
    # The fused matrix's views still are views of it: one copy, not two.
    assert attention.q_proj.weight.untyped_storage().data_ptr() == attention.qkv_weight.untyped_storage().data_ptr()
    assert attention.v_proj.weight.data_ptr() == attention.qkv_weight[-attention.v_proj.weight.shape[0]:].data_ptr()
    # Not moved (whether torch's own allocator advised its memory depends on THP_MEM_ALLOC_ENABLE).
    assert cache.data_ptr() == cache_address
    assert norm.data_ptr() == norm_address
    # A step reads one row of the embeddings: they move only as the head they are tied to.
    assert (embeddings.data_ptr() != embeddings_address) == tied
    fused_bytes = 4 * sum(w.numel() for layer in model.model.layers
                          for w in (layer.self_attn.qkv_weight, layer.self_attn.o_proj.weight,
                                    layer.mlp.gate_up_weight, layer.mlp.down_proj.weight))
    assert moved >= fused_bytes + 4 * model.lm_head.weight.numel()


def test_int8_rows_move_too():
    from models.quantize import quantize_model
    model = random_model(tiny_config(**WIDE), seed=5)
    model.fuse_projections()
    quantize_model(model)
    rows = model.model.layers[0].mlp.gate_up_int8
    values = rows.values.clone()
    huge_pages.hold_in_huge_pages(model, smallest=1)
    assert advised_for_huge_pages(rows.values) and advised_for_huge_pages(rows.scales)
    assert torch.equal(rows.values, values)


def test_nothing_moves_where_huge_pages_are_not_available(monkeypatch):
    model = random_model(tiny_config(**WIDE), seed=6)
    address = model.lm_head.weight.data_ptr()
    monkeypatch.setattr(huge_pages, "available", lambda: False)
    assert huge_pages.hold_in_huge_pages(model) == 0
    assert model.lm_head.weight.data_ptr() == address


def test_a_refused_mapping_leaves_the_weights_where_they_are(monkeypatch, caplog):
    model = random_model(tiny_config(**WIDE), seed=6)
    before = {name: (tensor.data_ptr(), tensor.clone()) for name, tensor in model.state_dict().items()}

    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages.mmap, "mmap", no_memory)
    with caplog.at_level("WARNING", logger="rivulet.engine"):
        assert huge_pages.hold_in_huge_pages(model) == 0
    assert "stay in the pages they were loaded in" in caplog.text and "Cannot allocate memory" in caplog.text
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() == before[name][0] and torch.equal(tensor, before[name][1])


@pytest.mark.parametrize("options", [{}, {"native_kernels": False}, {"quant": "int8"}],
                         ids=["native", "torch", "int8"])
def test_the_runner_serves_the_same_tokens_from_weights_in_huge_pages(options, monkeypatch):
    def streamed(runner, layer: int) -> torch.Tensor:  # a weight every step reads, past SMALLEST int8 or not
        mlp = runner.model.model.layers[layer].mlp
        return mlp.gate_up_int8.values if "quant" in options else mlp.gate_up_weight

    tokens, runner = greedy_run_with(random_model(tiny_config(**WIDE), seed=7), **options)
    first, second = streamed(runner, 0), streamed(runner, 1)
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()  # the one mapping
    assert advised_for_huge_pages(first)
    monkeypatch.setattr(huge_pages, "available", lambda: False)
    plain_tokens, _ = greedy_run_with(random_model(tiny_config(**WIDE), seed=7), **options)
    assert tokens == plain_tokens

"""Weights laid out for a CPU's matmul kernels: the same numbers through the kernel each row count is fastest in."""
import pytest
import torch
import torch.nn.functional as F

from models import cpu_weights
from models.compiled_decode import CompiledDecode
from models.exported_decode import ExportedDecode
from models.runner import LlamaRunner
from tests.models.support import greedy_run_with, random_model, tiny_config

needs_packing = pytest.mark.skipif(not cpu_weights.packing_available(), reason="this torch has no oneDNN")


def test_a_weight_stored_transposed_keeps_its_shape_and_values():
    weight = torch.randn(48, 32)
    stored = cpu_weights.stored_transposed(weight)
    assert stored.shape == weight.shape and torch.equal(stored, weight)
    assert not stored.is_contiguous() and stored.t().is_contiguous()  # memory holds W.T


@pytest.mark.parametrize("rows, dtype, packed", [
    (1, torch.float32, False),  # one row: the transposed weight's matrix-vector product
    (2, torch.float32, True),
    (64, torch.float32, True),
    (cpu_weights.PACKED_MAX_ROWS, torch.float32, True),
    (cpu_weights.PACKED_MAX_ROWS + 1, torch.float32, False),  # a long prompt: the plain kernel
    (1, torch.bfloat16, True),  # bf16's packed kernel wins from one row
    (1, torch.float16, False),
])
def test_the_kernel_is_chosen_by_row_count_and_dtype(rows, dtype, packed):
    assert cpu_weights.uses_packed(rows, dtype) is packed


@needs_packing
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 1, 64), (1, 40, 64), (300, 64)])
def test_linear_gives_f_linear_results_through_either_kernel(shape, monkeypatch):
    weight = cpu_weights.stored_transposed(torch.randn(96, 64))
    packed = cpu_weights.pack(weight)
    x = torch.randn(shape)
    calls = []
    real = cpu_weights._packed_matmul
    monkeypatch.setattr(cpu_weights, "_packed_matmul", lambda *a: calls.append(1) or real(*a))
    out = cpu_weights.linear(x, weight, packed)
    assert out.shape == (*shape[:-1], 96)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    rows = x.numel() // x.shape[-1]
    assert bool(calls) == cpu_weights.uses_packed(rows, x.dtype)  # it went where uses_packed says


@needs_packing
def test_a_model_laid_out_for_the_cpu_computes_what_it_did_and_keeps_its_state_dict():
    model = random_model(tiny_config(max_position_embeddings=64), seed=3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tokens = torch.tensor([[1, 5, 9, 2, 7], [1, 3, 3, 8, 4]])
    with torch.inference_mode():
        expected = model(tokens)
        model.lay_out_for_cpu(pack=True)
        after = model(tokens)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[name], before[name]) for name in before)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.qkv_packed is not None and mlp.gate_up_packed is not None
    assert attention.o_proj.packed is not None and mlp.down_proj.packed is not None
    assert model.lm_head.packed is not None
    assert attention.qkv_weight.t().is_contiguous() and model.lm_head.weight.t().is_contiguous()
    # q, k and v are still views of the fused matrix: one copy of the weights, not two.
    assert attention.q_proj.weight.data_ptr() == attention.qkv_weight.data_ptr()


def test_without_packing_no_copy_is_made():
    model = random_model(tiny_config(max_position_embeddings=64), seed=3)
    model.lay_out_for_cpu(pack=False)
    assert model.model.layers[0].self_attn.qkv_packed is None and model.lm_head.packed is None


def test_a_tied_head_keeps_the_embeddings_layout():
    model = random_model(tiny_config(max_position_embeddings=64, tie_word_embeddings=True), seed=3)
    model.lay_out_for_cpu(pack=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.is_contiguous()


@needs_packing
def test_packing_is_skipped_when_the_copy_would_crowd_memory():
    model = random_model(tiny_config(max_position_embeddings=64), seed=3)
    size = cpu_weights.projection_bytes(model)
    assert size > 0
    assert cpu_weights.packing_pays(model, None)  # free memory unknown
    assert cpu_weights.packing_pays(model, 4 * size)
    assert not cpu_weights.packing_pays(model, 4 * size - 1)
    assert not cpu_weights.packing_pays(model.half(), None)  # no packed fp16 kernel


@needs_packing
def test_the_runner_decodes_the_same_greedy_tokens_with_and_without_packing():
    model = random_model(tiny_config(max_position_embeddings=128), seed=6)
    packed, _ = greedy_run_with(model, packed_weights=True)
    assert model.lm_head.packed is not None
    plain, _ = greedy_run_with(model, packed_weights=False)
    assert model.lm_head.packed is None
    assert packed == plain


def test_the_runner_lays_out_a_cpu_model_once_loaded():
    model = random_model(tiny_config(max_position_embeddings=64), seed=3)
    LlamaRunner(model, max_batch=2, packed_weights=False, native_kernels=False)
    assert model.lm_head.weight.t().is_contiguous()


def test_the_native_one_row_step_keeps_the_weights_in_their_loaded_layout():
    model = random_model(tiny_config(max_position_embeddings=64), seed=3)
    runner = LlamaRunner(model, max_batch=2, packed_weights=False)
    if runner.native_step is None:
        pytest.skip("no C compiler for the native kernels")
    assert model.lm_head.weight.is_contiguous() and model.model.layers[0].self_attn.qkv_weight.is_contiguous()


@needs_packing
@pytest.mark.parametrize("setting, free, packed", [
    (True, None, True),
    (False, None, False),  # RIVULET_PACKED_WEIGHTS=0
    (True, 10 ** 12, True),
    (True, 400_000, False),  # the copy would take more than its share of the free memory
])
def test_the_backend_packs_the_weights_as_set_and_as_memory_allows(tiny_checkpoint, monkeypatch, setting, free,
                                                                  packed):
    from models import llm_backend

    monkeypatch.setattr(llm_backend, "free_bytes", lambda device: free)
    monkeypatch.setattr(llm_backend, "file_backed_bytes", lambda tensors: 0)  # the packed copy's room alone
    backend = llm_backend.LlamaBackend(tiny_checkpoint, torch.device("cpu"), max_batch=1, max_context=32,
                                       packed_weights=setting)
    backend.load()
    assert (backend.runner.model.lm_head.packed is not None) is packed


# torch.compile's first import touches torch.jit, which warns of its own deprecation.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_one_row_in_a_compiled_step_is_a_dot_product_per_weight_row():
    """A weight in its loaded layout [out, in] (RIVULET_COMPILE keeps it so): one row goes through
    ``row_dots`` when compiled, and gives what ``F.linear`` gives."""
    weight = torch.randn(96, 64)
    x = torch.randn(1, 1, 64)
    traced = []
    real = cpu_weights.row_dots

    def spy(*args):
        traced.append(1)
        return real(*args)

    compiled = torch.compile(lambda x, w: cpu_weights.linear(x, w, None), fullgraph=True)
    # A compiled runner's warm-up earlier in this process leaves the stance at "eager on recompile".
    with pytest.MonkeyPatch.context() as patch, torch.compiler.set_stance("default"):
        patch.setattr(cpu_weights, "row_dots", spy)
        out = compiled(x, weight)
    assert traced  # the compiled graph took the dot products, not F.linear
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    # In eager mode the product would be materialized [out, in]: F.linear serves.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_weights, "row_dots", spy)
        traced.clear()
        cpu_weights.linear(x, weight, None)
    assert not traced


def test_a_compiling_runner_keeps_the_weights_in_their_loaded_layout(monkeypatch):
    monkeypatch.setattr(CompiledDecode, "warm_up", lambda self, max_batch: None)  # the layout is what is tested
    monkeypatch.setattr(ExportedDecode, "build", lambda self: None)
    model = random_model(tiny_config(max_position_embeddings=64), seed=3)
    LlamaRunner(model, max_batch=2, compile_decode=True, packed_weights=False)
    attention = model.model.layers[0].self_attn
    assert attention.qkv_weight.is_contiguous() and model.lm_head.weight.is_contiguous()
    assert model.model.layers[0].mlp.down_proj.weight.is_contiguous()
    eager_model = random_model(tiny_config(max_position_embeddings=64), seed=3)
    LlamaRunner(eager_model, max_batch=2, packed_weights=False, native_kernels=False)
    assert eager_model.model.layers[0].self_attn.qkv_weight.t().is_contiguous()  # eager: stored transposed


def test_a_dtype_the_cpu_cannot_pack_is_served_unpacked(monkeypatch):
    """oneDNN's bf16 packing needs AVX-512 or AVX-NE-CONVERT; on a CPU without them the model loads unpacked."""
    def unsupported(*args):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", unsupported)
    monkeypatch.setattr(cpu_weights, "packing_available", lambda: True)
    assert cpu_weights.pack(torch.randn(8, 8, dtype=torch.bfloat16)) is None

"""RIVULET_COMPILE on a CPU: the batch-1 step compiled ahead of time (models/exported_decode.py) gives the
eager step's tokens, writes the model's own cache, reads the model's own weights, and steps aside
(to torch.compile's step) where it does not apply or did not build."""
import pytest
import torch

from models import exported_decode
from models.exported_decode import ExportedDecode
from models.runner import LlamaRunner
from tests.models.support import greedy_run_with, random_model, tiny_config

# torch.compile's first import touches torch.jit, which warns of its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

CONTEXT = 64


@pytest.fixture(scope="module")
def built():
    """One model whose runner compiled at load, as the engine loads it (in inference mode), and the greedy
    tokens of the same requests through an eager runner of the same weights. Built once: it compiles."""
    with torch.inference_mode():
        model = random_model(tiny_config(max_position_embeddings=CONTEXT), seed=11)
    # The native one-row step (models/native_step.py) would serve batch 1 instead: off, to test the library.
    tokens, runner = greedy_run_with(model, compile_decode=True, native_kernels=False)
    eager, _ = greedy_run_with(random_model(tiny_config(max_position_embeddings=CONTEXT), seed=11))
    return model, runner, tokens, eager


def test_the_batch_1_steps_run_ahead_of_time_and_give_the_eager_tokens(built):
    model, runner, tokens, eager = built
    assert runner.exported.error is None
    # The last request decodes alone for five steps (greedy_run_with): those went through the library, all
    # five unless the thread policy tried another thread count for some (where an earlier test in this
    # process left torch with fewer threads than cores).
    assert 0 < runner.exported.steps <= 5
    assert tokens == eager


def test_a_step_writes_the_models_own_cache_in_place_and_gives_the_eager_logits(built):
    model, runner, _, _ = built
    caches = [layer.self_attn.cache for layer in model.model.layers]
    tokens, positions = torch.tensor([7]), torch.tensor([9])
    with torch.inference_mode():
        before = [(c.k.clone(), c.v.clone()) for c in caches]
        ahead = runner.exported(tokens, positions, 10)
        written = [(c.k.clone(), c.v.clone()) for c in caches]
        for cache, (k, v) in zip(caches, before):
            cache.k.copy_(k)
            cache.v.copy_(v)
        expected = model.decode(tokens, positions, 10, False)
    torch.testing.assert_close(ahead, expected, rtol=1e-5, atol=1e-5)
    others = torch.ones(caches[0].k.shape[:3], dtype=torch.bool)  # [B, KV, S]: all but row 0's position 9
    others[0, :, 9] = False
    for cache, (k, v), (k_ahead, v_ahead) in zip(caches, before, written):
        # Row 0 at position 9 holds what the eager step wrote there, and nothing else changed.
        torch.testing.assert_close(k_ahead, cache.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v_ahead, cache.v, rtol=1e-5, atol=1e-5)
        assert not torch.equal(k_ahead[0, :, 9], k[0, :, 9])
        assert torch.equal(k_ahead[others], k[others]) and torch.equal(v_ahead[others], v[others])


def test_a_step_reads_the_weights_of_the_moment(built):
    """The library holds the model's tensors, not copies: a weight changed in place is the one it uses."""
    model, runner, _, _ = built
    tokens, positions = torch.tensor([3]), torch.tensor([2])
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.inference_mode():
        before = runner.exported(tokens, positions, 3)
        down.mul_(3)
        try:
            changed = runner.exported(tokens, positions, 3)
            expected = model.decode(tokens, positions, 3, False)
        finally:
            down.div_(3)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(changed, expected, rtol=1e-5, atol=1e-5)


def test_it_serves_batch_1_steps_within_the_cache_at_its_own_thread_count(built):
    _, runner, _, _ = built
    exported = runner.exported
    assert exported.serves(exported.threads, 2)
    assert exported.serves(exported.threads, CONTEXT - 1)
    assert not exported.serves(exported.threads, CONTEXT)  # the last position: torch.compile's step
    assert not exported.serves(exported.threads + 1, 8)  # its kernels keep the thread count they were built for


def test_a_step_that_does_not_build_leaves_batch_1_to_torch_compile(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(exported_decode.torch._inductor, "aoti_compile_and_package", no_compiler, raising=False)
    model = random_model(tiny_config(max_position_embeddings=CONTEXT), seed=11)
    LlamaRunner(model, max_batch=2, compile_decode=False)  # the caches and the layout, as a compiling runner has
    caches = [layer.self_attn.cache for layer in model.model.layers]
    step = ExportedDecode(model, threads=torch.get_num_threads())
    step.build()
    assert step.error == "RuntimeError: no C++ compiler found"
    assert not step.serves(step.threads, 8)
    assert "not compiled ahead of time, torch.compile serves it" in caplog.text
    # The model is as it was: its own caches are back in place (the build detaches them while it exports).
    assert [layer.self_attn.cache for layer in model.model.layers] == caches
    assert all(cache is not None for cache in caches)

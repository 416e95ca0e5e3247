"""RIVULET_COMPILE: the compiled decode step gives the eager step's tokens, and a failed compile serves eager."""
import pytest
import torch

from models import compiled_decode
from models.exported_decode import ExportedDecode
from models.runner import LlamaRunner
from tests.models.support import greedy_run_with, random_model, tiny_config

# torch.compile's first import touches torch.jit, which warns of its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def torch_compile_only(monkeypatch):
    """These tests are about torch.compile's step: the batch-1 step ahead of time (tested in
    test_exported_decode.py) is not built, which leaves batch 1 to torch.compile and saves its compile."""
    def not_built(self):
        self.error = "not built in this test"

    monkeypatch.setattr(ExportedDecode, "build", not_built)


def greedy_run(model, compile_decode: bool) -> tuple[list[list[int]], LlamaRunner]:
    # Without the native kernels, whose step would serve every row count before the compiled one.
    return greedy_run_with(model, compile_decode=compile_decode, native_kernels=False)


@pytest.fixture(scope="module")
def model():
    model = random_model(tiny_config(max_position_embeddings=128), seed=6)
    model.fuse_projections()
    return model


def test_compiled_decode_gives_the_tokens_of_the_eager_one(model):
    eager, _ = greedy_run(model, compile_decode=False)
    compiled, runner = greedy_run(model, compile_decode=True)
    assert runner.compiled is not None and runner.compiled.error is None  # it did compile
    assert runner.compiled.serves(torch.get_num_threads())
    # The decode steps above went through the compiled kernels (all 12 unless the thread policy tried a
    # thread count they were not compiled for, on a machine with more cores than torch's default).
    assert runner.compiled.steps > 0
    assert compiled == eager


def test_a_decode_step_that_does_not_compile_runs_eager(model, monkeypatch, caplog):
    def no_compiler(fn, **options):
        def broken(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return broken

    monkeypatch.setattr(compiled_decode.torch, "compile", no_compiler)
    eager, _ = greedy_run(model, compile_decode=False)
    fallen_back, runner = greedy_run(model, compile_decode=True)
    assert runner.compiled.error == "RuntimeError: no C++ compiler found" and runner.compiled.steps == 0
    assert runner.exported is None  # not tried either: it needs the same compiler
    assert "did not compile, it runs eager" in caplog.text
    assert fallen_back == eager


def test_the_compiled_step_reads_the_weights_of_the_moment(model):
    """The compiled step skips guards on the model's modules: a weight replaced after compiling must still
    be the one it multiplies by (the step would otherwise serve stale weights without a word)."""
    compiled_model = random_model(tiny_config(max_position_embeddings=64), seed=8)
    runner = LlamaRunner(compiled_model, max_batch=2, compile_decode=True, native_kernels=False)
    assert runner.compiled.error is None
    tokens, positions = torch.tensor([3]), torch.tensor([2])
    head = compiled_model.lm_head
    with torch.inference_mode():
        head.weight = torch.nn.Parameter(head.weight * 2, requires_grad=False)
        head.packed = None
        compiled_model.model.layers[0].mlp.down_proj.weight.mul_(3)
        torch.testing.assert_close(runner.compiled(tokens, positions, 3, False),
                                   compiled_model.decode(tokens, positions, 3, False), rtol=1e-5, atol=1e-5)

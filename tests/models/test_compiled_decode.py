"""RIVULET_COMPILE: the compiled decode step gives the eager step's tokens, and a failed compile serves eager."""
import pytest
import torch

from models import compiled_decode
from models.api import GenerationRequest, SamplingParams
from models.runner import LlamaRunner
from models.sequence import Sequence
from tests.models.support import random_model, tiny_config

# torch.compile's first import touches torch.jit, which warns of its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def greedy_run(model, compile_decode: bool) -> tuple[list[list[int]], LlamaRunner]:
    """Three requests of different lengths, greedy, 12 tokens each: ragged steps, then batch 1 at the end."""
    runner = LlamaRunner(model, max_batch=3, compile_decode=compile_decode)
    seqs = [Sequence(GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=99, temperature=0.0,
                                                                       ignore_eos=True), 1e12), None, set(), 128)
            for i, prompt in enumerate([[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 4]])]
    with torch.inference_mode():
        for result in runner.prefill(seqs):
            result.seq.output_ids.append(result.token)
        for step in range(12):
            for result in runner.decode():
                result.seq.output_ids.append(result.token)
            if step == 6:  # two leave: the last one decodes alone (batch 1)
                runner.release(seqs[0])
                runner.release(seqs[2])
    return [s.output_ids for s in seqs], runner


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
    assert "did not compile, it runs eager" in caplog.text
    assert fallen_back == eager

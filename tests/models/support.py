"""Helpers for the engine tests: tiny checkpoints on disk, a recording sink, an engine on a thread.

Everything is CPU-only and made here (no downloads): a sentencepiece tokenizer trained on a short
built-in corpus with byte fallback, and Llama checkpoints with seeded random weights.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import sentencepiece as spm
import torch

from models.api import Finished, GenerationRequest, SamplingParams, TextDelta
from models import native_build, native_step
from models.checkpoint import save_checkpoint
from models.config import LlamaConfig
from models.engine import Engine
from models.llama import Llama
from models.llm_backend import LlamaBackend
from models.outputs import Sampled
from models.quantize import Int8Rows, quantize_model
from models.runner import LlamaRunner
from models.sequence import Sequence

# Mixed scripts so the tokenizer has multi-byte pieces; characters outside it (most emoji, rare
# Chinese) become byte-fallback pieces.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
To be or not to be, that is the question. All that glitters is not gold; fortune favours the bold.
Streams of tokens flow to many clients at once, and every client reads its own words in order.
天下大事，必作于细。千里之行，始于足下。学而时习之，不亦说乎？有朋自远方来，不亦乐乎？
知之为知之，不知为不知，是知也。海内存知己，天涯若比邻。春眠不觉晓，处处闻啼鸟。
Café, naïve, résumé: accents are characters too. Numbers 0123456789 and symbols !?#%&*()[]{}.
"""
TOKENIZER_VOCAB = 400


def train_tokenizer(directory: Path) -> Path:
    """A small BPE sentencepiece model with byte fallback, like the demo's; -> its path."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=TOKENIZER_VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return directory / "tokenizer.model"


def tiny_config(**overrides) -> LlamaConfig:
    """The ``tiny-gqa`` preset (grouped-query attention) with the tokenizer's vocabulary."""
    values = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    values.update(overrides)
    return LlamaConfig(**values)


def random_model(config: LlamaConfig, seed: int, std: float = 0.02) -> Llama:
    torch.manual_seed(seed)
    model = Llama(config).init_weights(std)
    with torch.no_grad():  # non-trivial norms, so a wrong norm shows up in comparisons
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model.eval()


def greedy_run_with(model: Llama, **runner_options) -> tuple[list[list[int]], LlamaRunner]:
    """Three requests of different lengths through a ``LlamaRunner(model, max_batch=3, **runner_options)``,
    greedy, 12 tokens each: ragged batched steps, then two leave and the last decodes alone (batch 1).
    -> (each request's tokens, the runner)"""
    runner = LlamaRunner(model, max_batch=3, **runner_options)
    seqs = [Sequence(GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=99, temperature=0.0,
                                                                       ignore_eos=True), 1e12), None, set(), 128)
            for i, prompt in enumerate([[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 4]])]
    with torch.inference_mode():
        for result in runner.prefill(seqs):
            result.seq.output_ids.append(result.token)
        for step in range(12):
            for result in runner.decode():
                result.seq.output_ids.append(result.token)
            if step == 6:
                runner.release(seqs[0])
                runner.release(seqs[2])
    return [s.output_ids for s in seqs], runner


def write_checkpoint(directory: Path, model: Llama, tokenizer: Path, *,
                     tokenizer_config: dict | None = None) -> Path:
    save_checkpoint(model, directory)
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return directory


@dataclass
class RecordingSink:
    """Collects a request's events; ``wait()`` blocks until its ``Finished`` arrives."""

    events: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def put(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Finished):
            self.done.set()

    def wait(self, timeout: float = 60.0) -> Finished:
        if not self.done.wait(timeout):
            raise TimeoutError("the request never finished")
        return self.finished

    @property
    def finished(self) -> Finished:
        ends = [e for e in self.events if isinstance(e, Finished)]
        if len(ends) != 1 or self.events[-1] is not ends[0]:
            raise AssertionError(f"expected exactly one Finished, last: {self.events}")
        return ends[0]

    @property
    def deltas(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, TextDelta)]

    @property
    def text(self) -> str:
        return "".join(self.deltas)


class RecordingBackend(LlamaBackend):
    """The real backend, also noting every sampled token id by request (tests compare ids, not text)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tokens: dict[str, list[int]] = {}

    def execute(self, batch):
        outputs = super().execute(batch)
        for output in outputs:
            if isinstance(output, Sampled):
                self.tokens.setdefault(output.ticket.request_id, []).append(output.token)
        return outputs


def request(prompt_ids: list[int], *, deadline_s: float = 60.0, **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=list(prompt_ids),
                             sampling=SamplingParams(**sampling), deadline=time.monotonic() + deadline_s)


@contextlib.contextmanager
def running_engine(backend, *, max_batch: int = 4, max_waiting: int = 16) -> Iterator[Engine]:
    """An Engine whose ``run()`` is on a plain thread (no gevent in these tests), stopped afterwards."""
    engine = Engine(backend, max_batch=max_batch, max_waiting=max_waiting, torch_threads=1)
    thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    thread.start()
    try:
        wait_for(lambda: engine.state != "starting", what="the engine to load")
        yield engine
    finally:
        engine.shutdown()
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError("the engine thread did not stop")


def wait_for(condition, *, timeout: float = 30.0, what: str = "a condition") -> None:
    """Poll ``condition`` (engine state changes happen on another thread)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def generate(engine: Engine, prompt_ids: list[int], **sampling) -> RecordingSink:
    """Submit one request and wait for its end."""
    sink = RecordingSink()
    engine.submit(request(prompt_ids, **sampling), sink)
    sink.wait()
    return sink


def native_product(weight: torch.Tensor, x: torch.Tensor, int8: Int8Rows | None = None) -> torch.Tensor:
    """``x @ weight.T`` through the native kernels' batched product (``multiply_rows_by``), reading ``int8``'s
    rows where given. Scratch and output start as NaN: padding must not leak into the result."""
    library = native_build.load()
    function = library.multiply_rows_by
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.POINTER(native_step._Matrix), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int]
    scratch = library.multiply_rows_scratch
    scratch.restype = ctypes.c_int64
    scratch.argtypes = [ctypes.c_int64, ctypes.c_int64]
    rows, (out_features, in_features) = x.shape[0], weight.shape
    packed = torch.full((scratch(rows, in_features),), float("nan"))  # padding must not leak into outputs
    y = torch.full((rows, out_features), float("nan"))
    matrix = native_step._Matrix(weight.data_ptr(), out_features, in_features, weight.stride(0))
    if int8 is not None:
        matrix.quantized, matrix.scales = int8.values.data_ptr(), int8.scales.data_ptr()
    assert function(ctypes.byref(matrix), x.data_ptr(), rows, y.data_ptr(), packed.data_ptr(), 2) == 0
    return y


def prepared(config: LlamaConfig, rows: int, seed: int = 5, quantized: bool = False) -> Llama:
    """A model laid out as a runner lays it out where the native step serves (``quantized``: with
    RIVULET_QUANT=int8), each of its ``rows`` cache rows holding a prompt of its own length (3 to 12 tokens)."""
    model = random_model(config, seed=seed)
    model.setup_cache(rows, config.max_position_embeddings)
    model.fuse_projections()
    if quantized:
        quantize_model(model)
    model.lay_out_for_cpu(pack=False, transposed=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for row in range(rows):
            length = 3 + row % 10
            prompt = torch.randint(3, config.vocab_size, (1, length), generator=generator)
            model.prefill(prompt, torch.tensor([row]), torch.tensor([length]))
    return model

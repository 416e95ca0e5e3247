"""The shipped demo model (models/demo) loads and streams.

Its weights are retrained from time to time, so these tests assert properties, not its text.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import load_config
from models.config import LlamaConfig
from models.llm_backend import LlamaBackend
from tests.models.support import RecordingSink, request, running_engine

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def demo():
    backend = LlamaBackend(DEMO, torch.device("cpu"), max_batch=4)
    with running_engine(backend, max_batch=4) as engine:
        yield backend, engine


def test_demo_is_the_demo_preset_and_small():
    assert load_config(DEMO) == LlamaConfig.from_name("demo")
    assert (DEMO / "model.safetensors").stat().st_size <= 12 * 1024 * 1024


def test_demo_streams_the_same_greedy_text_to_concurrent_requests(demo):
    backend, engine = demo
    assert engine.ready and backend.tokenizer.vocab_size == backend.config.vocab_size
    prompt = backend.tokenizer.encode_prompt("A journey of a thousand miles")
    sinks = [RecordingSink() for _ in range(3)]
    for sink in sinks:
        engine.submit(request(prompt, max_tokens=24), sink)
    finished = [sink.wait() for sink in sinks]
    for end in finished:
        assert end.reason in ("stop", "length") and end.error is None
        assert end.prompt_tokens == len(prompt) and 1 <= end.completion_tokens <= 24
    texts = {sink.text for sink in sinks}
    assert len(texts) == 1
    deltas = [e for e in sinks[0].events[:-1]]
    assert [d.completion_tokens for d in deltas] == sorted(d.completion_tokens for d in deltas)


def test_demo_streams_from_a_chat_prompt_in_chinese(demo):
    backend, engine = demo
    prompt = backend.tokenizer.encode_chat([{"role": "user", "content": "千里之行，始于足下。"}])
    sink = RecordingSink()
    engine.submit(request(prompt, max_tokens=32, temperature=0.8, seed=1, ignore_eos=True), sink)
    end = sink.wait()
    assert end.reason == "length" and end.completion_tokens == 32
    assert sink.text and all(d for d in sink.deltas)  # text arrived, never as empty deltas

"""Our Llama against HF transformers' LlamaForCausalLM on the same random checkpoint.

The checkpoint is written by transformers itself (``save_pretrained``, safetensors), so this also
checks that we read HF's files, key names and config as a user's download would have them.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from models.checkpoint import load_model
from models.llm_backend import LlamaBackend
from tests.models.support import RecordingBackend, request, running_engine, RecordingSink

transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 17, 250, 3, 99, 42], [1, 5], [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309]]
NEW_TOKENS = 12


def hf_config(**overrides):
    values = dict(vocab_size=400, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    values.update(overrides)
    config = transformers.LlamaConfig(**values)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 5000.0}  # not the default 10000
    return config


def hf_model(config, seed: int):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, or a wrong norm would go unnoticed
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, tokenizer_path):
    model = hf_model(hf_config(), seed=3)
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    shutil.copyfile(tokenizer_path, directory / "tokenizer.model")
    return model, directory


def hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_logits_match_hf(hf_checkpoint):
    hf, directory = hf_checkpoint
    ours = load_model(directory, torch.device("cpu"))
    assert ours.config.rope_theta == 5000.0  # read from transformers 5's rope_parameters
    tokens = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    with torch.inference_mode():
        expected = hf(tokens).logits
        actual = ours(tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_through_the_engine_match_hf_generate(hf_checkpoint):
    """All prompts at once in one batch (different lengths) must each give HF's greedy tokens."""
    hf, directory = hf_checkpoint
    backend = RecordingBackend(directory, torch.device("cpu"), max_batch=4)
    with running_engine(backend, max_batch=4) as engine:
        requests = [request(p, max_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS]
        sinks = [RecordingSink() for _ in PROMPTS]
        for req, sink in zip(requests, sinks):
            engine.submit(req, sink)
        for sink in sinks:
            assert sink.wait().reason == "length"
    for prompt, req in zip(PROMPTS, requests):
        assert backend.tokens[req.request_id] == hf_greedy(hf, prompt)


def test_tied_embeddings_and_sharded_checkpoint_load(tmp_path, tokenizer_path):
    hf = hf_model(hf_config(tie_word_embeddings=True), seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = load_model(tmp_path, torch.device("cpu"))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    tokens = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    shutil.copyfile(tokenizer_path, tmp_path / "tokenizer.model")
    assert LlamaBackend(tmp_path, torch.device("cpu"), max_batch=1).context_length == 128

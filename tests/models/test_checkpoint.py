"""Checkpoint loading: what a good directory gives, and errors that name the file and field at fault."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import load_meta, load_model
from models.config import LlamaConfig
from models.errors import CheckpointError
from models.llm_backend import LlamaBackend, load_tokenizer

CPU = torch.device("cpu")


@pytest.fixture
def checkpoint(tmp_path, tiny_checkpoint):
    """A private copy of the tiny checkpoint that a test may break."""
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, directory)
    return directory


def edit_config(directory, **changes):
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_a_good_checkpoint_loads_fp32_on_cpu(checkpoint):
    model = load_model(checkpoint, CPU)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.config.num_key_value_heads == 2
    backend = LlamaBackend(checkpoint, CPU, max_batch=2)
    assert backend.context_length == 128 and backend.name == "ckpt"


def test_fp16_weights_load_as_fp32_on_cpu(checkpoint):
    path = checkpoint / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(path).items()}, path)
    assert load_model(checkpoint, CPU).model.embed_tokens.weight.dtype == torch.float32


def test_missing_config_json(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file is missing"):
        LlamaBackend(checkpoint, CPU, max_batch=1)


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"config\.json: field 'architectures' is \['GPT2LMHeadModel'\]"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"config\.json: field 'rope_scaling' asks for rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, r"config\.json: field 'hidden_act'"),
    ({"attention_bias": True}, r"config\.json: field 'attention_bias'"),
    ({"num_key_value_heads": 3}, r"config\.json: num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)"),
])
def test_unsupported_config(checkpoint, changes, message):
    edit_config(checkpoint, **changes)
    with pytest.raises(CheckpointError, match=message):
        LlamaBackend(checkpoint, CPU, max_batch=1)


def test_missing_required_field(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    del raw["hidden_size"]
    (checkpoint / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: required field 'hidden_size' is missing"):
        load_model(checkpoint, CPU)


def test_shape_mismatch_names_the_file_tensor_and_fields(checkpoint):
    edit_config(checkpoint, intermediate_size=200)
    with pytest.raises(CheckpointError) as info:
        load_model(checkpoint, CPU)
    message = str(info.value)
    assert "model.safetensors: tensor 'model.layers." in message
    assert "intermediate_size" in message and "config.json" in message


def test_missing_tensors_name_the_weights_file(checkpoint):
    edit_config(checkpoint, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensors missing .*num_hidden_layers=3"):
        load_model(checkpoint, CPU)


def test_missing_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        load_model(checkpoint, CPU)


def test_corrupt_weights(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(checkpoint, CPU)


def test_missing_shard_named_in_the_index(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00002.safetensors")
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard named in"):
        load_model(checkpoint, CPU)


def test_missing_tokenizer_model(checkpoint):
    (checkpoint / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: file is missing"):
        LlamaBackend(checkpoint, CPU, max_batch=1)


def test_bad_json_names_the_file(checkpoint):
    (checkpoint / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: not valid JSON"):
        load_tokenizer(checkpoint)


def test_meta_from_tokenizer_and_generation_config(checkpoint):
    (checkpoint / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False,
        "chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}"},
                          {"name": "tool_use", "template": "x"}],
    }))
    config = LlamaConfig.from_hf(json.loads((checkpoint / "config.json").read_text()))
    meta = load_meta(checkpoint, config)
    assert meta.eos_token_ids == (2, 7) and meta.add_bos_token is False
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.eos_ids == (2, 7)
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "hi"


def test_rope_theta_and_sliding_window_from_config():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=4096)
    assert LlamaConfig.from_hf({**base, "rope_theta": 500000.0}).rope_theta == 500000.0
    v5 = LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert v5.rope_theta == 1e6
    mistral = LlamaConfig.from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 1024})
    assert mistral.max_position_embeddings == 1024  # within one window, sliding attention is full attention
    assert LlamaConfig.from_hf({**base, "num_key_value_heads": None}).num_key_value_heads == 2

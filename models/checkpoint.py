"""Load (and write) Llama checkpoints in the HF directory layout.

A directory holds ``config.json``, ``model.safetensors`` or sharded ``model-0000N-of-0000M.safetensors``
with ``model.safetensors.index.json``, a sentencepiece ``tokenizer.model``, and optionally
``tokenizer_config.json`` / ``generation_config.json``. Every failure is a ``CheckpointError`` naming
the file and field at fault.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.config import LlamaConfig
from models.errors import CheckpointError
from models.llama import Llama

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointMeta:
    """What the loader learned besides the weights: token ids and the chat template."""

    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool
    chat_template: str | None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_config(directory: Path) -> LlamaConfig:
    return LlamaConfig.from_hf(read_json(directory / "config.json"), str(directory / "config.json"))


def load_meta(directory: Path, config: LlamaConfig) -> CheckpointMeta:
    tok_cfg = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    gen_cfg = read_json(directory / "generation_config.json") if (directory / "generation_config.json").is_file() else {}
    eos = gen_cfg.get("eos_token_id", config.eos_token_id)
    eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # HF allows named templates; take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return CheckpointMeta(
        bos_token_id=int(gen_cfg.get("bos_token_id", config.bos_token_id)),
        eos_token_ids=eos_ids,
        add_bos_token=bool(tok_cfg.get("add_bos_token", True)),
        chat_template=template,
    )


def weight_files(directory: Path) -> list[Path]:
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: field 'weight_map' is missing or empty")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named in {INDEX_FILE} is missing")
        return files
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}")


def read_state_dict(files: list[Path], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """-> (tensors by name, the file each came from)."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).to(dtype)
                    origin[key] = path
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return state, origin


def pick_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU (fast there, and exact); bf16 on CUDA where the GPU has it, else fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def shape_fields(name: str) -> str:
    """Which config.json fields decide the shape of tensor ``name`` (for error messages)."""
    table = {
        "embed_tokens.weight": "vocab_size x hidden_size",
        "lm_head.weight": "vocab_size x hidden_size",
        "q_proj.weight": "num_attention_heads*head_dim x hidden_size",
        "k_proj.weight": "num_key_value_heads*head_dim x hidden_size",
        "v_proj.weight": "num_key_value_heads*head_dim x hidden_size",
        "o_proj.weight": "hidden_size x num_attention_heads*head_dim",
        "gate_proj.weight": "intermediate_size x hidden_size",
        "up_proj.weight": "intermediate_size x hidden_size",
        "down_proj.weight": "hidden_size x intermediate_size",
        "norm.weight": "hidden_size",
        "layernorm.weight": "hidden_size",
    }
    return next((fields for suffix, fields in table.items() if name.endswith(suffix)), "the config")


def load_model(directory: Path, device: torch.device, dtype: torch.dtype | None = None) -> Llama:
    config_path = directory / "config.json"
    config = load_config(directory)
    dtype = dtype or pick_dtype(device)
    files = weight_files(directory)
    state, origin = read_state_dict(files, dtype)
    # HF files of some versions carry the rotary frequencies; they are derived, not learned.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = Llama(config)  # uninitialised storage (see llama.Linear): the checkpoint's tensors replace it
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(
            f"{files[0] if len(files) == 1 else directory / INDEX_FILE}: tensors missing that "
            f"{config_path.name} implies "
            f"(num_hidden_layers={config.num_hidden_layers}, "
            f"tie_word_embeddings={config.tie_word_embeddings}): {missing[:5]}"
        )
    if unexpected:
        raise CheckpointError(
            f"{origin[unexpected[0]]}: tensors {config_path.name} does not explain "
            f"(num_hidden_layers={config.num_hidden_layers}): {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{origin[name]}: tensor '{name}' has shape {tuple(tensor.shape)}, but {config_path}'s "
                f"{shape_fields(name)} gives {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared one
    return model.to(device).eval()


def save_checkpoint(model: Llama, directory: Path, *, dtype: torch.dtype = torch.float32,
                    extra_config: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (the tokenizer files are the caller's)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    raw = model.config.to_hf()
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    raw.update(extra_config or {})
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")

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
from safetensors import safe_open
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


def read_state_dict(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).to(dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return state


def pick_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(directory: Path, device: torch.device, dtype: torch.dtype | None = None) -> Llama:
    config = load_config(directory)
    dtype = dtype or pick_dtype(device)
    state = read_state_dict(weight_files(directory), dtype)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{directory}: tensors missing from the weights: {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{directory}: tensors the config does not explain: {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{directory}: tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary table) were created on meta: build them for real.
    from models.llama import RotaryTable
    model.rotary = RotaryTable(config.head_dim, config.max_position_embeddings, config.rope_theta)
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

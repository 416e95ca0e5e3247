"""Write a random-weight Llama checkpoint of a named size, in the HF layout the server loads.

    python -m bench.make_checkpoint bench-512 /tmp/bench-512

Sizes are the presets in ``models/config.py`` (``bench-512``: 512 wide, 8 layers, 8 heads, SwiGLU
1408, 8000-token vocabulary) and ``tinyllama-shape`` (TinyLlama 1.1B's shape, for GPU benchmarks:
``--dtype bfloat16 --tokenizer-vocab 8000`` keeps it quick to write). The directory gets ``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer_config.json`` and a sentencepiece ``tokenizer.model`` with
exactly the config's vocabulary size, so every id a random model samples decodes to real text (the
detokenizer's work is part of what the benchmark measures). The tokenizer is trained on the Python
standard library's source, which every machine that runs this has; ``--tokenizer`` copies one instead.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from models.checkpoint import save_checkpoint
from models.config import PRESETS, LlamaConfig
from models.llama import Llama

# Benchmark-only sizes, beside the presets: TinyLlama 1.1B's shape (grouped-query, 32000 vocabulary).
BENCH_SIZES: dict[str, dict] = {
    "tinyllama-shape": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                            rms_norm_eps=1e-5),
}
SIZES = {**PRESETS, **BENCH_SIZES}
CORPUS_BYTES = 3_000_000  # enough text for an 8000-piece BPE vocabulary, trained in well under a minute


def stdlib_corpus(path: Path) -> None:
    """The first ``CORPUS_BYTES`` of the standard library's top-level modules, one line a sentence."""
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            for line in source.read_text(encoding="utf-8", errors="ignore").splitlines():
                if line.strip():
                    out.write(line + "\n")
                    written += len(line) + 1
            if written >= CORPUS_BYTES:
                return


def train_tokenizer(vocab_size: int, directory: Path) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        stdlib_corpus(corpus)
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(scratch) / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
            max_sentence_length=16384, num_threads=2, minloglevel=2,
        )
        shutil.copyfile(Path(scratch) / "tokenizer.model", directory / "tokenizer.model")
    return directory / "tokenizer.model"


def write_random_checkpoint(name: str, directory: Path, *, seed: int = 0, tokenizer: Path | None = None,
                            dtype: torch.dtype = torch.float32, tokenizer_vocab: int | None = None) -> int:
    """-> the model's parameter count. ``tokenizer_vocab``: train a tokenizer of fewer pieces than the
    model's vocabulary (ids past it decode to nothing), quicker for a large vocabulary."""
    config = LlamaConfig(**SIZES[name])
    torch.manual_seed(seed)
    model = Llama(config).init_weights()
    save_checkpoint(model, directory, dtype=dtype)
    if tokenizer is None:
        tokenizer = train_tokenizer(min(tokenizer_vocab or config.vocab_size, config.vocab_size), directory)
    else:
        shutil.copyfile(tokenizer, directory / "tokenizer.model")
    pieces = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).vocab_size()
    if pieces > config.vocab_size:
        raise SystemExit(f"{tokenizer}: {pieces} pieces do not fit the model's vocab_size {config.vocab_size}")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}, indent=2) + "\n")
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2) + "\n")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=sorted(SIZES), help="a preset of models/config.py, or tinyllama-shape")
    parser.add_argument("out", type=Path, help="directory to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, help="copy this tokenizer.model instead of training one")
    parser.add_argument("--tokenizer-vocab", type=int, help="train a tokenizer of this many pieces (default: "
                        "the model's vocabulary)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="of the saved weights")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    params = write_random_checkpoint(args.size, args.out, seed=args.seed, tokenizer=args.tokenizer,
                                     dtype=getattr(torch, args.dtype), tokenizer_vocab=args.tokenizer_vocab)
    print(f"wrote {args.size} ({params / 1e6:.1f} M parameters) to {args.out}")


if __name__ == "__main__":
    main()

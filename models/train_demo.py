"""Train the shipped demo model (models/demo) from Debian's fortune databases.

    apt-get install fortunes fortunes-zh
    python -m models.train_demo --minutes 30

Writes an HF-layout checkpoint: a sentencepiece ``tokenizer.model`` (BPE with byte fallback, so rare
Chinese characters stream as several byte pieces), ``config.json``, fp16 ``model.safetensors``,
``tokenizer_config.json`` and ``generation_config.json``. Settings and corpus: models/demo/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

from models.checkpoint import save_checkpoint
from models.config import LlamaConfig
from models.llama import Llama

FORTUNE_DIR = Path("/usr/share/games/fortunes")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # fortunes-zh colours its poems
SKIPPED = {"ascii-art", "art"}  # pictures, not prose
OUT_DIR = Path(__file__).parent / "demo"
# The demo was trained on plain fortunes, not dialogues: a chat prompt is the messages' text, and
# the model goes on with a fortune.
DEMO_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


def read_fortunes(directory: Path) -> list[str]:
    docs: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_dir() or path.is_symlink() or path.name in SKIPPED:
            continue
        text = ANSI_ESCAPE.sub("", path.read_text(encoding="utf-8", errors="ignore"))
        docs.extend(d.strip("\n") for d in text.split("\n%\n") if d.strip())
    return docs


def train_tokenizer(docs: list[str], vocab_size: int, out: Path) -> spm.SentencePieceProcessor:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        for doc in docs:
            f.write(doc.replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.train(
        input=f.name, model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.99, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        max_sentence_length=16384, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=1, minloglevel=2,  # one thread: the same corpus gives the same vocabulary
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--work", type=Path, default=None, help="where to build before copying to --out")
    args = parser.parse_args()

    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig.from_name("demo")
    # Build in a scratch folder and copy at the end, so a served model folder never holds a
    # tokenizer from one run and weights from another.
    work = args.work or Path(tempfile.mkdtemp(prefix="rivulet-demo-"))
    work.mkdir(parents=True, exist_ok=True)

    docs = read_fortunes(FORTUNE_DIR)
    print(f"corpus: {len(docs)} fortunes, {sum(len(d) for d in docs)} characters")
    sp = train_tokenizer(docs, config.vocab_size, work)
    stream: list[int] = []
    for doc in docs:
        stream += [config.bos_token_id] + sp.encode(doc) + [config.eos_token_id]
    data = torch.tensor(stream, dtype=torch.long)
    print(f"tokens: {len(data)}")

    model = Llama(config).init_weights()
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget_s, start, step = args.minutes * 60, time.monotonic(), 0
    warmup = 50
    while (elapsed := time.monotonic() - start) < budget_s:
        progress = elapsed / budget_s
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,))
        batch = torch.stack([data[s:s + args.seq_len + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} elapsed {elapsed:.0f}s", flush=True)
        step += 1

    model.eval()
    save_checkpoint(model, work, dtype=torch.float16)
    (work / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "chat_template": DEMO_CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (work / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
    }, indent=2) + "\n", encoding="utf-8")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "config.json", "model.safetensors", "tokenizer_config.json",
                 "generation_config.json"):
        shutil.copyfile(work / name, args.out / name)
    print(f"trained {step} steps in {time.monotonic() - start:.0f}s, final loss {loss.item():.3f}")


if __name__ == "__main__":
    main()

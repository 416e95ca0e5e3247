"""The benchmark scripts still run (on the tiny preset, a few tokens): speed itself is bench/'s business."""
from __future__ import annotations

import sys

import sentencepiece as spm
import torch

from bench import engine_bench
from bench.make_checkpoint import write_random_checkpoint
from models.checkpoint import load_model


def test_make_checkpoint_then_engine_bench(tmp_path, monkeypatch, capsys):
    params = write_random_checkpoint("tiny-gqa", tmp_path)
    model = load_model(tmp_path, torch.device("cpu"))
    assert params == sum(p.numel() for p in model.parameters())
    tokenizer = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tokenizer.vocab_size() == model.config.vocab_size  # every sampled id decodes

    monkeypatch.setattr(sys, "argv", ["engine_bench", str(tmp_path), "--batches", "1,3", "--tokens", "4",
                                      "--repeat", "1", "--threads", "1"])
    engine_bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split()[:2] == ["1", "4"] and lines[-1].split()[:2] == ["3", "12"]
    assert lines[-2].endswith("1.0x")

"""The benchmark scripts still run (on the tiny preset, a few tokens): speed itself is bench/'s business."""
from __future__ import annotations

import sys

import sentencepiece as spm
import torch
from safetensors import safe_open

from bench import engine_bench, peer_bench
from bench.make_checkpoint import write_random_checkpoint
from models.checkpoint import load_model
from tests.live_server import live_server


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


def test_peer_bench_streams_every_token_from_each_server(tmp_path, capsys):
    """Against the real server twice (standing in for two servers): every point streams all its tokens."""
    with live_server({"RIVULET_DEVICE": "cpu"}, log_dir=tmp_path) as server:
        peer_bench.main([server.url, server.url + "/", "--concurrency", "1,3", "--tokens", "5", "--rounds", "1",
                         "--pause", "0"])
    out = capsys.readouterr().out
    assert "warning" not in out  # each point brought concurrency x tokens tokens
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["3"])]
    assert [row[:2] for row in rows] == [["1", "[0]"], ["1", "[1]"], ["3", "[0]"], ["3", "[1]"]]
    assert all(float(row[2]) > 0 for row in rows)


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (peer_bench.percentile(values, 50), peer_bench.percentile(values, 99)) == (50.0, 99.0)
    assert peer_bench.percentile([3.0], 99) == 3.0


def test_make_checkpoint_in_bf16_with_a_smaller_tokenizer(tmp_path):
    """What bench/gpu.sh asks for (bf16 weights, fewer tokenizer pieces than the vocabulary), on a tiny size."""
    write_random_checkpoint("tiny-gqa", tmp_path, dtype=torch.bfloat16, tokenizer_vocab=400)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as weights:
        assert weights.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).vocab_size() == 400

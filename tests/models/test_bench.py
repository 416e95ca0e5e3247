"""The benchmark scripts still run (on the tiny preset, a few tokens) and print a table that adds up:
speed itself is bench/'s business, but every row must have completed its requests in full, and each
ratio must be what the printed speeds say."""
from __future__ import annotations

import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from bench import engine_bench, peer_bench
from bench.make_checkpoint import write_random_checkpoint
from models.checkpoint import load_model
from tests.live_server import ROOT, live_server


def table_rows(out: str, first_header: str) -> list[list[str]]:
    """The rows printed under the header line that starts with ``first_header`` (up to the first line
    that does not start with a number), split on whitespace."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_header])
    rows = []
    for line in lines[header + 1:]:
        if not line.split() or not line.split()[0].isdigit():
            break
        rows.append(line.split())
    return rows


def test_make_checkpoint_then_engine_bench(tmp_path, monkeypatch, capsys):
    params = write_random_checkpoint("tiny-gqa", tmp_path)
    model = load_model(tmp_path, torch.device("cpu"))
    assert params == sum(p.numel() for p in model.parameters())
    tokenizer = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tokenizer.vocab_size() == model.config.vocab_size  # every sampled id decodes

    tokens_each = 4
    monkeypatch.setattr(sys, "argv", ["engine_bench", str(tmp_path), "--batches", "1,3", "--tokens",
                                      str(tokens_each), "--repeat", "1", "--threads", "1"])
    engine_bench.main()  # exits when a request fails or does not end by its length
    rows = table_rows(capsys.readouterr().out, "batch")
    assert [int(row[0]) for row in rows] == [1, 3]
    # Every request of a batch generated exactly --tokens tokens.
    assert [int(row[1]) for row in rows] == [1 * tokens_each, 3 * tokens_each]
    speeds = [float(row[3]) for row in rows]
    assert all(speed > 0 for speed in speeds)
    for row, speed in zip(rows, speeds):
        # tokens/s is tokens over seconds, within the printed rounding (seconds to 0.01, tokens/s to 0.1).
        assert int(row[1]) / speed == pytest.approx(float(row[2]), abs=0.005 + int(row[1]) * 0.05 / speed**2)
        # The ratio column is this row's tokens/s over the first row's, to the printed 0.1.
        assert row[4].endswith("x")
        assert float(row[4][:-1]) == pytest.approx(speed / speeds[0], rel=0.001, abs=0.051)


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


def test_prefill_stall_bench_runs_every_way(tmp_path, capsys):
    from bench import prefill_stall_bench

    write_random_checkpoint("tiny-gqa", tmp_path / "ckpt")
    prefill_stall_bench.main([str(tmp_path / "ckpt"), "--streams", "2", "--prompt-tokens", "120", "--chunk", "32",
                              "--tokens", "400", "--window", "0.2", "--rounds", "1", "--context", "1024",
                              "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = {name: line[len(name):].split() for line in lines
            for name in ("no long prompt", "one pass", "chunks up to 32") if line.startswith(name)}
    assert set(rows) == {"no long prompt", "one pass", "chunks up to 32"}
    assert rows["no long prompt"][2:] == ["1.00x", "-"]  # the baseline against itself, no long prompt
    for name in ("one pass", "chunks up to 32"):  # both ways measured gaps and the long prompt's first token
        p50, p99, ratio, ttft = rows[name]
        assert 0 < float(p50) <= float(p99) and ratio.endswith("x") and float(ttft) > 0


def test_prefix_bench_measures_both_ways(tmp_path, capsys):
    from bench import prefix_bench

    write_random_checkpoint("tiny-gqa", tmp_path / "ckpt")
    prefix_bench.main([str(tmp_path / "ckpt"), "--streams", "2", "--system-tokens", "100", "--question-tokens", "5",
                       "--tokens", "400", "--chunk", "32", "--context", "1024", "--rounds", "1", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = {name: line[len(name):].split() for line in lines
            for name in ("prefix caching", "no prefix caching") if line.startswith(name)}
    assert float(rows["prefix caching"][0]) > 0 and float(rows["no prefix caching"][0]) > 0
    # The second running stream and the new request copied the 100-token system prompt; without, nothing.
    assert rows["prefix caching"][1] == "200" and rows["no prefix caching"][1] == "0"
    assert lines[-1].startswith("time to first token without / with prefix caching: ") and lines[-1].endswith("x")


def test_decode_step_bench_prints_both_modes_and_the_floor(tmp_path, capsys):
    """bench/gpu.sh's batch-1 comparison, run on a CPU (where both runs are eager): each mode's step, their
    ratio and the floor add up as printed."""
    from bench import decode_step

    write_random_checkpoint("tiny-gqa", tmp_path / "ckpt")
    decode_step.main([str(tmp_path / "ckpt"), "--device", "cpu", "--tokens", "6", "--bandwidth", "1e11"])
    lines = capsys.readouterr().out.splitlines()
    assert "do not apply on this device" in lines[1]
    rows = [line.split() for line in lines if line.split()[:1] in (["eager"], ["graphs"]) and len(line.split()) == 3]
    steps = {row[0]: float(row[1]) for row in rows}
    assert set(steps) == {"eager", "graphs"} and all(ms > 0 for ms in steps.values())
    ratio = next(line for line in lines if line.startswith("graphs vs eager: "))
    assert float(ratio.split()[3].removesuffix("x")) == pytest.approx(steps["eager"] / steps["graphs"], rel=0.02)
    floor = next(line for line in lines if line.startswith("floor: "))
    floor_ms = float(floor.split(" = ")[1].split()[0])
    graphed_ratio = float(floor.split("graphed step ")[1].split("x")[0])
    assert floor_ms > 0 and graphed_ratio == pytest.approx(steps["graphs"] / floor_ms, rel=0.02)


def test_hub_bench_streams_every_token_and_prints_the_cpu_per_token():
    # Its own process: it puts prometheus_client in multiprocess mode, which is decided once, at import.
    done = subprocess.run([sys.executable, "-m", "bench.hub_bench", "--streams", "3", "--tokens", "20", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # a lost token would hang it
    assert done.returncode == 0, done.stderr
    assert "3 streams x 20 tokens, 1 a step: hub CPU" in done.stdout
    assert "3 streams x 20 tokens, 4 a step: hub CPU" in done.stdout and "x the first" in done.stdout


def test_attention_bench_checks_the_kernel_and_prints_the_ratio_it_measured(monkeypatch, capsys):
    from bench import attention_bench

    if attention_bench.ragged_attention.load() is None:
        pytest.skip("no C compiler to build the native decode attention")
    monkeypatch.setattr(sys, "argv", ["attention_bench", "--batches", "2,5", "--heads", "4", "--kv-heads", "2",
                                      "--positions", "64", "--max-keys", "60", "--rounds", "1", "--repeats", "3"])
    attention_bench.main()  # it asserts the two agree before timing them
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [int(row[0]) for row in rows] == [2, 5]
    for row in rows:
        sdpa_us, native_us, ratio = float(row[2]), float(row[3]), float(row[5])
        assert sdpa_us > 0 and native_us > 0
        assert ratio == pytest.approx(sdpa_us / native_us, rel=0.05, abs=0.01)


def test_huge_pages_bench_times_both_copies_of_the_weights(tmp_path, capsys):
    from bench import huge_pages_bench
    from models import huge_pages, native_build

    if native_build.load() is None or not huge_pages.available():
        pytest.skip("needs the native kernels and transparent huge pages")
    write_random_checkpoint("demo", tmp_path / "ckpt")  # projections past huge_pages.SMALLEST
    huge_pages_bench.main([str(tmp_path / "ckpt"), "--batches", "1,3", "--rounds", "2", "--steps", "2",
                           "--keys", "8", "--threads", str(torch.get_num_threads())])  # as later tests expect
    out = capsys.readouterr().out
    assert " MiB moved" in out and not out.startswith("demo, 0.0 MiB")
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row[0].strip() for row in rows] == ["1", "3"]
    for _, loaded, held, ratio in rows:
        assert float(loaded) > 0 and float(held) > 0
        assert float(ratio) == pytest.approx(float(loaded) / float(held), rel=0.02)

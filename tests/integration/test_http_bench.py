"""bench/http_bench.py still runs end to end (real server, in-process engine) on a tiny checkpoint; the
speed it prints is bench/'s business, not a test's."""
from __future__ import annotations

import sys

from bench import http_bench
from bench.make_checkpoint import write_random_checkpoint


def test_http_bench_streams_through_the_server_and_the_engine(tmp_path, monkeypatch, capsys):
    write_random_checkpoint("tiny-gqa", tmp_path)
    monkeypatch.setattr(sys, "argv", ["http_bench", str(tmp_path), "--concurrency", "1,2", "--tokens", "4"])
    http_bench.main()  # exits non-zero when a request fails or a stream is cut short
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[-2:]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert rows[0][4] == "1.0x"  # HTTP vs 1 clients
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)

"""bench/http_bench.py still runs end to end (real server, in-process engine) on a tiny checkpoint and
prints a table that adds up; the speed it prints is bench/'s business, not a test's."""
from __future__ import annotations

import sys

import pytest

from bench import http_bench
from bench.make_checkpoint import write_random_checkpoint

from tests.models.test_bench import table_rows


def recording(monkeypatch, name: str) -> list:
    """Wrap ``http_bench.<name>`` so the test sees every result it returns (warm-up runs included)."""
    results: list = []
    original = getattr(http_bench, name)

    def record(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(http_bench, name, record)
    return results


def test_http_bench_streams_through_the_server_and_the_engine(tmp_path, monkeypatch, capsys):
    write_random_checkpoint("tiny-gqa", tmp_path)
    http_runs, engine_runs = recording(monkeypatch, "run_http"), recording(monkeypatch, "run_batch")
    tokens_each = 4
    monkeypatch.setattr(sys, "argv", ["http_bench", str(tmp_path), "--concurrency", "1,2", "--tokens",
                                      str(tokens_each)])
    http_bench.main()  # exits non-zero when a request fails or a stream is cut short

    # Past the warm-up, both sides ran the same requests in full: equal token totals, C x --tokens each.
    expected = [1 * tokens_each, 2 * tokens_each]
    assert [run.tokens for run in http_runs[1:]] == expected
    assert [run.tokens for run in engine_runs[1:]] == expected

    rows = table_rows(capsys.readouterr().out, "clients")
    assert [int(row[0]) for row in rows] == [1, 2]
    http_speed, engine_speed = [float(row[1]) for row in rows], [float(row[2]) for row in rows]
    assert all(speed > 0 for speed in http_speed + engine_speed)
    for row, http, engine in zip(rows, http_speed, engine_speed):
        # HTTP/engine is this row's two speeds' ratio (printed to 0.01); the next column is its HTTP
        # speed over the first row's (printed to 0.1). Both within the rounding of the printed speeds.
        assert row[3].endswith("x") and row[4].endswith("x")
        assert float(row[3][:-1]) == pytest.approx(http / engine, rel=0.001, abs=0.006)
        assert float(row[4][:-1]) == pytest.approx(http / http_speed[0], rel=0.001, abs=0.051)
        assert row[-1] == "ms" and float(row[-2]) >= 0  # median time to first token

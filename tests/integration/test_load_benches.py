"""The load benches still run end to end at a tiny size (real server, real clients); their figures are
bench/'s business, not a test's. Each exits non-zero when what it checks fails."""
from __future__ import annotations

import sys

from bench import soak, storm_bench, streams_bench


def test_streams_bench_serves_every_stream(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["streams_bench", "--streams", "20", "--time-limit-s", "2", "--warm-up", "2"])
    streams_bench.main()
    out = capsys.readouterr().out
    assert "got a heartbeat              20 of 20" in out and "ended with [DONE]            20 of 20" in out
    assert "KiB per open stream" in out


def test_storm_bench_leaves_nothing_behind(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["storm_bench", "--clients", "10", "--storms", "1"])
    storm_bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("warm-up: 10 clients hung up (5 running, 5 queued)")
    assert lines[1].startswith("storm 1: 10 clients hung up (5 running, 5 queued)") and "cancelled +10" in lines[1]


def test_soak_runs_every_kind_of_request(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["soak", "--minutes", "0.05", "--interval-s", "3", "--clients", "3"])
    soak.main()
    out = capsys.readouterr().out
    assert "errors {}" in out and "worker RSS series (MiB):" in out
    for action in soak.ACTIONS:
        assert f"'{action}':" in out, action

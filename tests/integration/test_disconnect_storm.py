"""A disconnect storm leaves nothing behind: 200 clients hang up at once mid-stream, 100 of them while
generating and 100 while queued; afterwards nothing runs or waits, every hang-up was counted as a
cancellation, exactly once, and the worker's memory is back where it was (bench/storm_bench.py runs
the same storm at 1,000 clients)."""
from __future__ import annotations

import pytest

from bench.storm_bench import RSS_TOLERANCE, report, server_env, storm
from bench.worker_memory import worker_pid
from service.limits import SPARE_FILES, raise_open_files_limit
from tests.live_server import live_server

CLIENTS = 200
SETTLE_TIMEOUT_S = 30  # for the streams to start, and for each gauge to settle after the storm


def test_a_storm_of_hang_ups_running_and_queued_leaves_nothing_behind(tmp_path):
    if raise_open_files_limit(CLIENTS)[1] < CLIENTS + SPARE_FILES:
        pytest.skip(f"the hard limit on open files is below {CLIENTS + SPARE_FILES} (raise it with ulimit -Hn)")
    with live_server(server_env(CLIENTS), log_dir=tmp_path) as server:
        worker = worker_pid(server.proc.pid)
        # The first storm is a warm-up: what it allocates once (greenlets, KV-cache pages) is not a leak.
        storm(server, CLIENTS, worker, settle_timeout=SETTLE_TIMEOUT_S)
        result = storm(server, CLIENTS, worker, settle_timeout=SETTLE_TIMEOUT_S)

    assert (result.hung_up_running, result.hung_up_queued) == (CLIENTS // 2, CLIENTS // 2), report(result)
    assert (result.running_after, result.waiting_after, result.open_streams_after) == (0, 0, 0), report(result)
    assert result.cancelled == CLIENTS, report(result)
    assert abs(result.rss_change) <= RSS_TOLERANCE, report(result)

"""One worker holds 3,000 open event streams at once: every one gets heartbeats, and every one ends with
[DONE] (after a timeout error event here). Past ~1,000 connections a worker's descriptors pass 1024, where
``select``-based code breaks; this is the size at which that showed (streams cut before their first event).

The served package takes one request at a time and the first one holds it past the time limit, so every
stream but that one waits queued, quiet, getting ``: ping`` every second until its time runs out."""
from __future__ import annotations

import time

import pytest

from bench.stream_swarm import Swarm
from bench.streams_bench import holding_body, server_env
from service.limits import SPARE_FILES, raise_open_files_limit
from tests.live_server import live_server
from tests.sse_client import DONE, events_from_bytes, payloads

STREAMS = 3000
HEARTBEAT_S = 1
TIMEOUT_S = 20  # long enough for all 3,000 to connect and get a ping before the first ones end
# The first request holds the package past its time limit, so every stream ends the same way (a timeout
# error event, then [DONE]) and each is quiet long enough to be pinged.
BODY = holding_body(TIMEOUT_S)


def test_one_worker_holds_3000_streams_with_heartbeats_and_an_end_for_each(tmp_path):
    # The server's master lifts its own limit (gunicorn.conf.py); this process needs one too, for its clients.
    if raise_open_files_limit(STREAMS)[1] < STREAMS + SPARE_FILES:
        pytest.skip(f"the hard limit on open files is below {STREAMS + SPARE_FILES}: this process cannot "
                    f"open {STREAMS} sockets (raise it with ulimit -Hn)")
    with live_server(server_env(STREAMS, HEARTBEAT_S, TIMEOUT_S), log_dir=tmp_path) as server, \
            Swarm(server.url, "/v1/sse", lambda index: BODY) as swarm:
        swarm.open(STREAMS)
        all_pinged = swarm.pump(lambda: swarm.all_opened and swarm.count(lambda c: c.pinged) == STREAMS,
                                timeout=TIMEOUT_S + 10)
        ended_early = [c for c in swarm.clients if c.ended]
        never_pinged = [c for c in swarm.clients if not c.pinged]
        assert all_pinged and not ended_early, (
            f"{STREAMS - len(never_pinged)} of {STREAMS} streams got a heartbeat, {len(ended_early)} had "
            f"already ended; never pinged: {_describe(never_pinged[:2])}; ended: {_describe(ended_early[:2])}")

        all_ended = swarm.pump(lambda: swarm.count(lambda c: c.ended) == STREAMS, timeout=TIMEOUT_S + 15)
        assert all_ended, f"{swarm.count(lambda c: c.ended)} of {STREAMS} streams ended in time"
        log = server.log()

    assert [c for c in swarm.clients if c.error or c.status != 200] == []
    kinds: dict[str, int] = {}
    for client in swarm.clients:
        events = payloads(events_from_bytes(bytes(client.body)))
        assert events[-1] == DONE and client.first_ping_at < client.done_at, _describe([client])
        ending = events[-2]
        kind = ending["error"]["code"] if isinstance(ending, dict) and "error" in ending else "output"
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {"request_timeout": STREAMS}
    assert '"finish_reason":"cancelled"' not in log


def _describe(clients: list) -> str:
    now = time.monotonic()
    return "; ".join(f"#{c.index} status {c.status} error {c.error} ended {now - (c.ended_at or now):.1f}s ago "
                     f"body {bytes(c.body[:200])!r}" for c in clients)

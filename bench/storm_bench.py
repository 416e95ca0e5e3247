"""A disconnect storm: many clients hang up mid-stream at the same moment, half of them while their
request runs and half while it waits queued. Afterwards nothing may be left behind.

    .venv/bin/python -m bench.storm_bench                  # 1,000 clients, 500 running + 500 queued
    .venv/bin/python -m bench.storm_bench --clients 200

Starts the real server on the demo model with ``RIVULET_MAX_BATCH`` = half the clients, opens every
stream at once (long generations, so none ends by itself), waits until half are generating and the
other half are queued, and closes every connection. A running stream notices at its next token; a
queued one writes nothing until its next ``: ping``, so it notices then (``RIVULET_HEARTBEAT_S``, 1 s
here). Then it checks that ``rivulet_requests_running`` and ``rivulet_requests_waiting`` are back to 0,
that ``rivulet_requests_cancelled_total`` went up by exactly the number of hang-ups, and that the
worker's resident memory is within 10% of where it was before the storm. One storm of the same size
runs first as a warm-up, so the baseline already holds what a first storm allocates once (greenlet
pools, the KV cache's pages). Exits non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.stream_swarm import Swarm
from bench.worker_memory import MiB, rss_bytes, worker_pid
from service.limits import SPARE_FILES, raise_open_files_limit
from tests.integration.streams import metric, wait_for_metric
from tests.live_server import LiveServer, live_server

# A long generation: no stream may end by itself before the storm.
STREAM_BODY = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 200,
               "ignore_eos": True, "temperature": 0, "stream": True}
RSS_TOLERANCE = 0.10
# A queued stream notices its client left at its next heartbeat (RIVULET_HEARTBEAT_S below), plus slack.
QUEUED_NOTICE_S = 1.5


def server_env(clients: int) -> dict[str, str]:
    """Half the clients fit in the batch, the other half wait; the short heartbeat is how queued streams
    notice their client left; a short context keeps the KV cache of a large batch small."""
    return {"RIVULET_DEVICE": "cpu", "RIVULET_MAX_BATCH": str(clients // 2), "RIVULET_MAX_WAITING": str(clients),
            "RIVULET_MAX_CONTEXT": "256", "RIVULET_HEARTBEAT_S": "1", "RIVULET_REQUEST_TIMEOUT_S": "300"}


@dataclass(frozen=True)
class StormResult:
    clients: int
    hung_up_running: int  # had received a token
    hung_up_queued: int  # had received only the response head and retry:
    running_after: float
    waiting_after: float
    open_streams_after: float
    cancelled: float  # rivulet_requests_cancelled_total's increase
    rss_before: int
    rss_after: int
    seconds_to_settle: float

    @property
    def rss_change(self) -> float:
        return self.rss_after / self.rss_before - 1

    def problems(self) -> list[str]:
        found = []
        if self.running_after or self.waiting_after or self.open_streams_after:
            found.append(f"left behind: {self.running_after:g} running, {self.waiting_after:g} waiting, "
                         f"{self.open_streams_after:g} open streams")
        if self.cancelled != self.clients:
            found.append(f"cancelled counter went up by {self.cancelled:g}, not {self.clients}")
        if abs(self.rss_change) > RSS_TOLERANCE:
            found.append(f"worker RSS moved by {self.rss_change:+.1%}")
        return found


def storm(server: LiveServer, clients: int, worker: int, settle_timeout: float = 60.0) -> StormResult:
    """Open ``clients`` streams, wait until half run and half wait, hang up all of them at once, and see
    what is left. The server must run with ``server_env(clients)``."""
    running = clients // 2
    cancelled_before = metric(server, "rivulet_requests_cancelled_total")
    rss_before = rss_bytes(worker)
    with Swarm(server.url, "/v1/chat/completions", lambda index: STREAM_BODY) as swarm:
        swarm.open(clients)
        ready = swarm.pump(lambda: swarm.all_opened and swarm.count(lambda c: c.status is not None) == clients
                           and swarm.count(lambda c: c.has_data) == running, timeout=settle_timeout)
        failed = [c for c in swarm.clients if c.ended or c.status != 200]
        if not ready or failed:
            raise RuntimeError(f"the storm's streams did not all start: {swarm.count(lambda c: c.has_data)} "
                               f"running; {len(failed)} failed, e.g. {failed[0].status if failed else None} "
                               f"{failed[0].error if failed else None}")
        hung_up_running = swarm.count(lambda c: c.has_data)
        swarm.hang_up(swarm.clients)
    hung_up_at = time.monotonic()
    running_after = wait_for_metric(server, "rivulet_requests_running", 0, timeout=settle_timeout)
    waiting_after = wait_for_metric(server, "rivulet_requests_waiting", 0, timeout=settle_timeout)
    open_after = wait_for_metric(server, "rivulet_open_streams", 0, timeout=settle_timeout)
    wait_for_metric(server, "rivulet_requests_cancelled_total", cancelled_before + clients, timeout=settle_timeout)
    settled = time.monotonic() - hung_up_at
    time.sleep(QUEUED_NOTICE_S)  # a hang-up counted twice would show by now
    cancelled = metric(server, "rivulet_requests_cancelled_total") - cancelled_before
    return StormResult(clients, hung_up_running, clients - hung_up_running, running_after, waiting_after,
                       open_after, cancelled, rss_before, rss_bytes(worker), settled)


def report(result: StormResult) -> str:
    return (f"{result.clients} clients hung up ({result.hung_up_running} running, {result.hung_up_queued} queued); "
            f"settled in {result.seconds_to_settle:.1f} s: running {result.running_after:g}, waiting "
            f"{result.waiting_after:g}, open streams {result.open_streams_after:g}, cancelled +{result.cancelled:g}; "
            f"worker RSS {result.rss_before / MiB:.1f} -> {result.rss_after / MiB:.1f} MiB "
            f"({result.rss_change:+.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000, help="an even number: half run, half wait")
    parser.add_argument("--storms", type=int, default=3, help="measured storms, after one warm-up storm")
    args = parser.parse_args()
    if raise_open_files_limit(args.clients)[1] < args.clients + SPARE_FILES:
        raise SystemExit(f"this process cannot open {args.clients} sockets: raise the hard limit (ulimit -Hn)")
    problems = []
    with tempfile.TemporaryDirectory() as logs, live_server(server_env(args.clients), log_dir=Path(logs)) as server:
        worker = worker_pid(server.proc.pid)
        print(f"warm-up: {report(storm(server, args.clients, worker))}", flush=True)
        for number in range(1, args.storms + 1):
            result = storm(server, args.clients, worker)
            print(f"storm {number}: {report(result)}", flush=True)
            problems += result.problems()
    if problems:
        raise SystemExit("; ".join(problems))


if __name__ == "__main__":
    main()

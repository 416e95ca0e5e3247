"""How many open event streams one worker holds, and what each costs.

    .venv/bin/python -m bench.streams_bench                       # 10,000 streams
    .venv/bin/python -m bench.streams_bench --streams 3000 --heartbeat-s 1 --time-limit-s 60

Starts the real server (``gunicorn -c gunicorn.conf.py wsgi:app`` on a free loopback port, one gevent
worker) serving the ``words`` example package, which runs one request at a time: the first request holds
it (its words come 2 s apart, past the time limit), so every other stream waits queued and quiet, getting
a ``: ping`` every ``--heartbeat-s``, until its time limit ends it with a timeout error event and
``[DONE]``. That is the cheapest stream a worker holds, and the one a deep queue has by the thousand.

All clients live in this process, on one epoll loop (bench/stream_swarm.py). It prints how many streams
got a heartbeat and how many ended with ``[DONE]``, the time from the first connect to the last stream's
first heartbeat, and the worker's resident memory per open stream: VmRSS with every stream open minus
VmRSS before (after a warm-up), over the number of streams. Exits non-zero unless every stream was served.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from bench.stream_swarm import Swarm
from bench.worker_memory import KiB, MiB, rss_bytes, worker_pid
from service.limits import SPARE_FILES, raise_open_files_limit
from tests.live_server import ROOT, live_server

WORDS_PACKAGE = ROOT / "models" / "packages" / "words"
WORD_DELAY_MS = 2000  # the package's longest pause between two words


def holding_body(time_limit_s: float) -> dict:
    """A words request that runs past the time limit, so the package stays busy for the whole bench."""
    words = math.ceil(time_limit_s * 1000 / WORD_DELAY_MS) + 2
    return {"prompt": " ".join(f"word{i}" for i in range(words)), "delay_ms": WORD_DELAY_MS}


def server_env(streams: int, heartbeat_s: float, time_limit_s: float) -> dict[str, str]:
    return {"RIVULET_MODEL": str(WORDS_PACKAGE), "RIVULET_DEVICE": "cpu", "RIVULET_HEARTBEAT_S": str(heartbeat_s),
            "RIVULET_MAX_WAITING": str(streams + 100), "RIVULET_REQUEST_TIMEOUT_S": str(time_limit_s)}


def warm_up(url: str, count: int = 50) -> None:
    """A few quick streams first, so one-time costs (imports, caches, the first greenlets) are in the
    baseline rather than counted against the streams."""
    with Swarm(url, "/v1/sse", lambda index: {"prompt": "warm up", "delay_ms": 0}) as swarm:
        swarm.open(count)
        if not swarm.pump(lambda: swarm.all_opened and swarm.count(lambda c: c.ended) == count, timeout=60):
            raise SystemExit("the warm-up streams did not end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--heartbeat-s", type=float, default=1.0, help="the server's RIVULET_HEARTBEAT_S")
    parser.add_argument("--time-limit-s", type=float, default=90.0,
                        help="the server's RIVULET_REQUEST_TIMEOUT_S: how long each stream stays open")
    parser.add_argument("--warm-up", type=int, default=50, help="quick streams before the baseline is read")
    args = parser.parse_args()
    if raise_open_files_limit(args.streams)[1] < args.streams + SPARE_FILES:
        raise SystemExit(f"this process cannot open {args.streams} sockets: raise the hard limit (ulimit -Hn)")

    body = holding_body(args.time_limit_s)
    env = server_env(args.streams, args.heartbeat_s, args.time_limit_s)
    with tempfile.TemporaryDirectory() as logs, live_server(env, log_dir=Path(logs)) as server:
        worker = worker_pid(server.proc.pid)
        warm_up(server.url, args.warm_up)
        time.sleep(1)  # let the server close the warm-up's connections
        rss_before = rss_bytes(worker)
        with Swarm(server.url, "/v1/sse", lambda index: body) as swarm:
            started = time.monotonic()
            swarm.open(args.streams)
            swarm.pump(lambda: swarm.all_opened and swarm.count(lambda c: c.pinged or c.ended) == args.streams,
                       timeout=args.time_limit_s)
            rss_open = rss_bytes(worker)
            open_now = swarm.count(lambda c: not c.ended)
            pinged = [c.first_ping_at for c in swarm.clients if c.pinged]
            swarm.pump(lambda: swarm.count(lambda c: c.ended) == args.streams, timeout=args.time_limit_s + 30)
            done = swarm.count(lambda c: c.done)
            failed = [c for c in swarm.clients if c.error or c.status != 200]

    print(f"{args.streams} streams on one worker (words package queued behind one long request), heartbeat "
          f"{args.heartbeat_s:g} s, time limit {args.time_limit_s:g} s")
    print(f"got a heartbeat         {len(pinged):>7} of {args.streams}")
    print(f"ended with [DONE]       {done:>7} of {args.streams}")
    if pinged:
        print(f"last first heartbeat    {max(pinged) - started:>7.1f} s after the first connect")
    print(f"worker RSS              {rss_before / MiB:.1f} MiB before, {rss_open / MiB:.1f} MiB with {open_now} open: "
          f"{(rss_open - rss_before) / max(open_now, 1) / KiB:.1f} KiB per open stream")
    if failed:
        print(f"failed: {len(failed)}, e.g. status {failed[0].status}, {failed[0].error}")
    if len(pinged) < args.streams or done < args.streams or failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

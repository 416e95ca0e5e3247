"""A long mixed load against one server, to see that nothing accumulates: memory, open streams, queues.

    .venv/bin/python -m bench.soak --minutes 10                  # starts its own server (the demo model)
    .venv/bin/python -m bench.soak --minutes 60 --url http://127.0.0.1:8080 --pid 12345

``--clients`` threads (default 8) each loop over a random mix of what real clients do:

- ``stream``: a streamed chat completion, read to ``[DONE]``;
- ``whole``: a non-streamed completion (one JSON answer);
- ``resumable``: ``POST /v1/streams`` then ``GET`` its URL to the ``done`` event; every other one is
  deleted afterwards (``DELETE``), the rest expire after the retention time;
- ``hang_up``: a streamed chat completion closed after its first token;
- ``bad_body``: a body that is not JSON, which must get a 400 with the JSON error shape.

Every minute (``--interval-s``) it prints the requests served and the errors by kind since the start, and the worker's
resident memory (read from /proc, so only for a server it started or one whose worker ``--pid`` is given),
its open streams and its running and waiting requests. At the end it prints the RSS series and its change
from the end of the first minute (the warm-up) to the last; a flat series is the goal. Exits non-zero when
any request failed in a way it should not have.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from httpx_sse import connect_sse

from bench.worker_memory import MiB, rss_bytes, worker_pid
from tests.live_server import live_server

CHAT = {"messages": [{"role": "user", "content": "Tell me a fortune."}], "max_tokens": 48, "temperature": 0.8}
COMPLETION = {"prompt": "A fool and his money", "max_tokens": 24, "temperature": 0.8}
# Finished resumable streams are kept this long in the soak's server (default 300 s), so the series
# reaches its steady state within the first minutes.
RETENTION_S = 60
SERVER_ENV = {"RIVULET_DEVICE": "cpu", "RIVULET_HEARTBEAT_S": "1", "RIVULET_STREAM_RETENTION_S": str(RETENTION_S)}
DONE = "[DONE]"


class Failure(Exception):
    """A request ended in a way it should not have; the message is its kind, for counting."""


class Tally:
    """Served requests and failures by kind, shared by the client threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.served: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    def add(self, action: str, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.served[action] += 1
            else:
                self.errors[f"{action}: {error}"] += 1

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.served), dict(self.errors)


def _read_stream(client: httpx.Client, method: str, url: str, *, body: dict | None = None,
                 hang_up_after_first: bool = False) -> None:
    """Read an event stream to its last event; an error event or a missing [DONE] is a Failure."""
    with connect_sse(client, method, url, json=body) as source:
        if source.response.status_code != 200:
            raise Failure(f"HTTP {source.response.status_code}")
        for event in source.iter_sse():
            if event.data == DONE:
                return
            payload = json.loads(event.data)
            if "error" in payload:
                raise Failure(f"error event {payload['error'].get('code')}")
            if hang_up_after_first:
                return  # leaving the block closes the connection mid-stream
    raise Failure("ended without [DONE]")


def stream(client: httpx.Client, url: str, rng: random.Random) -> None:
    _read_stream(client, "POST", url + "/v1/chat/completions", body={**CHAT, "stream": True})


def hang_up(client: httpx.Client, url: str, rng: random.Random) -> None:
    _read_stream(client, "POST", url + "/v1/chat/completions", body={**CHAT, "stream": True, "max_tokens": 400,
                                                                      "ignore_eos": True}, hang_up_after_first=True)


def whole(client: httpx.Client, url: str, rng: random.Random) -> None:
    response = client.post(url + "/v1/completions", json=COMPLETION)
    if response.status_code != 200 or "choices" not in response.json():
        raise Failure(f"HTTP {response.status_code}")


def resumable(client: httpx.Client, url: str, rng: random.Random) -> None:
    created = client.post(url + "/v1/streams", json={**CHAT, "kind": "chat"})
    if created.status_code != 201:
        raise Failure(f"create: HTTP {created.status_code}")
    stream_url = url + created.json()["url"]
    _read_stream(client, "GET", stream_url)
    if rng.random() < 0.5:
        deleted = client.delete(stream_url)
        if deleted.status_code != 204:
            raise Failure(f"delete: HTTP {deleted.status_code}")


def bad_body(client: httpx.Client, url: str, rng: random.Random) -> None:
    response = client.post(url + "/v1/chat/completions", content=b'{"messages": [',
                           headers={"Content-Type": "application/json"})
    error = response.json().get("error", {}) if response.headers.get("content-type", "").startswith(
        "application/json") else {}
    if response.status_code != 400 or not {"message", "type", "code", "param"} <= error.keys():
        raise Failure(f"HTTP {response.status_code} {error.get('code')}")


ACTIONS: dict[str, tuple[Callable[[httpx.Client, str, random.Random], None], int]] = {
    # name: (what it does, weight in the mix)
    "stream": (stream, 4), "whole": (whole, 2), "resumable": (resumable, 2), "hang_up": (hang_up, 2),
    "bad_body": (bad_body, 1),
}


def client_loop(url: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    names = list(ACTIONS)
    weights = [ACTIONS[name][1] for name in names]
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            name = rng.choices(names, weights)[0]
            try:
                ACTIONS[name][0](client, url, rng)
            except Failure as exc:
                tally.add(name, str(exc))
            except httpx.HTTPError as exc:
                tally.add(name, type(exc).__name__)
            else:
                tally.add(name, None)


def server_gauges(client: httpx.Client, url: str) -> str:
    text = client.get(url + "/metrics").text
    values = {}
    for name in ("rivulet_open_streams", "rivulet_requests_running", "rivulet_requests_waiting"):
        line = next((line for line in text.splitlines() if line.startswith(name + " ")), f"{name} ?")
        values[name] = line.split()[1]
    return (f"open streams {values['rivulet_open_streams']}, running {values['rivulet_requests_running']}, "
            f"waiting {values['rivulet_requests_waiting']}")


def soak(url: str, worker: int | None, minutes: float, clients: int, interval_s: float = 60.0) -> int:
    """Run the load; print a line every ``interval_s``. -> the number of failed requests."""
    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client_loop, args=(url, seed, stop, tally), daemon=True)
               for seed in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    rss_series: list[int] = []
    with httpx.Client(timeout=30) as probe:
        for report in range(1, max(1, round(minutes * 60 / interval_s)) + 1):
            time.sleep(max(0.0, started + report * interval_s - time.monotonic()))
            served, errors = tally.snapshot()
            rss = f"worker RSS {rss_bytes(worker) / MiB:.1f} MiB, " if worker else ""
            if worker:
                rss_series.append(rss_bytes(worker))
            print(f"{report * interval_s / 60:>5.1f} min: served {sum(served.values())} {dict(sorted(served.items()))}; "
                  f"errors {dict(sorted(errors.items()))}; {rss}{server_gauges(probe, url)}", flush=True)
    stop.set()
    for thread in threads:
        thread.join(timeout=180)
    if rss_series:
        print("worker RSS series (MiB): " + " ".join(f"{value / MiB:.1f}" for value in rss_series))
        if len(rss_series) > 1:
            print(f"change from the first report to the last: {rss_series[-1] / rss_series[0] - 1:+.1%}")
    return sum(tally.snapshot()[1].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8, help="client threads, each one request at a time")
    parser.add_argument("--url", help="a running server (default: start one serving the demo model)")
    parser.add_argument("--pid", type=int, help="with --url: the worker's pid, to read its memory")
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds between two reports")
    args = parser.parse_args()
    if args.url:
        failed = soak(args.url.rstrip("/"), args.pid, args.minutes, args.clients, args.interval_s)
    else:
        with tempfile.TemporaryDirectory() as logs, live_server(SERVER_ENV, log_dir=Path(logs)) as server:
            failed = soak(server.url, worker_pid(server.proc.pid), args.minutes, args.clients, args.interval_s)
    if failed:
        raise SystemExit(f"{failed} requests failed")


if __name__ == "__main__":
    main()

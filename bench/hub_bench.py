"""The event loop's CPU time per streamed token, on the path every token takes through a worker.

    .venv/bin/python -m bench.hub_bench                       # 64 streams, 100 tokens each, 5 rounds
    .venv/bin/python -m bench.hub_bench --streams 1 --tokens 500

In one worker the engine thread makes the tokens and the event loop (gevent's hub, the main thread)
streams them: bridge, channel, the request's job (metrics, OpenAI chunk), SSE framing. Every microsecond
the hub spends per token is taken from the cores the model steps on (two on a small CPU machine), and at
thousands of tokens a second (a GPU) the hub is what caps a worker. This measures that path alone, with
no model and no sockets: an OS thread stands in for the engine and posts one text event to each of
``--streams`` channels a step, as a batched step does (``--behind N``: N events, as for a stream that has
fallen behind), then waits until every stream has written them; each stream is a greenlet reading a real
``Job`` (completion chunks) into writes as a served stream does (``service.responses.stream_writes``). Prometheus runs in multiprocess mode (its values in files), as under gunicorn.

It prints the hub thread's CPU time per token (``time.thread_time``), the median of ``--rounds`` rounds
after a warm-up, for each ``--behind`` (by default 1 and 4 events a stream a step, the rounds alternating)
and each one's ratio to the first: what joining the writes of a stream that fell behind saves. What the sockets, WSGI and gunicorn add on top is in bench/README.md section 13
(measured per worker thread from /proc around a real server's run).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from types import SimpleNamespace

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="rivulet-hub-bench-"))

import gevent  # noqa: E402  (prometheus_client reads the variable above when it is imported)

from models.api import Finished, TextDelta  # noqa: E402
from service import sse  # noqa: E402
from service.channel import Bridge  # noqa: E402
from service.jobs import Job  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.openai_stream import COMPLETION, ResponseShape  # noqa: E402
from service.responses import stream_writes  # noqa: E402


def stand_in_runtime(bridge: Bridge) -> SimpleNamespace:
    """What a Job reads of the worker's runtime: an engine to abort, metrics, the heartbeat, the bridge."""
    return SimpleNamespace(engine=SimpleNamespace(abort=lambda ticket, reason: None),
                           metrics=Metrics(running=lambda: 0, waiting=lambda: 0),
                           settings=SimpleNamespace(heartbeat_s=15.0), bridge=bridge)


def one_round(runtime: SimpleNamespace, streams: int, tokens: int, behind: int = 1) -> float:
    """-> the hub's CPU seconds per token of one round"""
    consumed = [0]
    jobs = []
    for index in range(streams):
        started = time.monotonic()
        job = Job(runtime, f"bench-{index}", COMPLETION, started, started + 3600, stream=True,
                  shape=ResponseShape(COMPLETION, f"bench-{index:08d}", "bench-512"))
        job._channel = runtime.bridge.channel()  # what Job._submit does, without an engine
        job._ticket = object()
        jobs.append(job)

    def read(job: Job) -> None:
        for write in stream_writes(job, sse.EventIds(), lambda: False):
            consumed[0] += write.count(b"\n\n")  # events in this write (a ": ping" has no blank line)
        job.close()

    def engine() -> None:
        for step in range(0, tokens, behind):
            target = consumed[0] + streams * behind
            for job in jobs:
                for token in range(step, step + behind):
                    job._channel.put(TextDelta(" word", token + 1))
            while consumed[0] < target:  # the next step starts once this one's tokens are out
                time.sleep(0.0002)
        for job in jobs:
            job._channel.put(Finished("length", 7, tokens))

    readers = [gevent.spawn(read, job) for job in jobs]
    thread = threading.Thread(target=engine, name="engine")
    cpu = time.thread_time()
    thread.start()
    gevent.joinall(readers, raise_error=True)
    cpu = time.thread_time() - cpu
    thread.join()
    return cpu / (streams * tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per stream")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--behind", default="1,4",
                        help="events each stream gets per step, one or more (compared with the first, the rounds "
                             "alternating): more than 1 is a stream fallen behind the engine, its events joined")
    args = parser.parse_args(argv)
    behinds = [int(b) for b in args.behind.split(",")]
    if any(args.tokens % b for b in behinds):
        parser.error("--tokens must be a multiple of every --behind")
    bridge = Bridge()
    runtime = stand_in_runtime(bridge)
    for behind in behinds:  # warm-up: imports, first allocations
        one_round(runtime, args.streams, behind * 5, behind)
    rounds: dict[int, list[float]] = {b: [] for b in behinds}
    for _ in range(args.rounds):
        for behind in behinds:
            rounds[behind].append(one_round(runtime, args.streams, args.tokens, behind))
    bridge.close()
    first = statistics.median(rounds[behinds[0]])
    for behind in behinds:
        median = statistics.median(rounds[behind])
        ratio = "" if behind == behinds[0] else f", {median / first:.2f}x the first"
        print(f"{args.streams} streams x {args.tokens} tokens, {behind} a step: hub CPU {median * 1e6:.1f} us per "
              f"token{ratio} (median of {args.rounds} rounds: {', '.join(f'{r * 1e6:.1f}' for r in rounds[behind])})")

if __name__ == "__main__":
    main()

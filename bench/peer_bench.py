"""The same streaming load against several OpenAI-compatible servers, side by side.

    .venv/bin/python -m bench.peer_bench http://127.0.0.1:8000 http://127.0.0.1:8081
    .venv/bin/python -m bench.peer_bench URL_A URL_B --concurrency 1,16,64 --rounds 2 --tokens 128

For each concurrency C, C clients each stream one ``/v1/completions`` request at once (greedy,
``ignore_eos``, ``max_tokens`` tokens, the same prompt) and read every event up to ``[DONE]``. Servers are
measured in turn, the order flipping every round, so slow drifts of a shared machine hit all of them
alike; each figure is the median over the rounds. Per server and C it prints aggregate streamed
tokens/s, time to first token (p50, p99) and the gap between tokens (p50, p99). The first URL is the
server under test: ``ratio`` is its tokens/s over each other server's.

The client is one asyncio loop (httpx streaming) and reads only what it must, so it takes a small share
of a CPU even at 64 streams; it prints its own CPU time per point: when that nears a whole core, the
client is the bottleneck and the figures say more about it than about the servers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field

import httpx

DEFAULT_PROMPT = "Once upon a time, in a quiet village by the sea, there lived an old clockmaker who"


@dataclass
class StreamTiming:
    """One request: when it was sent, when each token-bearing event arrived, how many tokens it brought."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass(frozen=True)
class Point:
    """One server at one concurrency in one round."""

    tokens: int
    seconds: float
    ttft_s: list[float]
    gaps_s: list[float]
    client_cpu_s: float
    failures: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered) / 100) - 1))]


def completion_tokens(event: dict) -> int | None:
    """The usage figure of a final chunk, when the server sends one."""
    usage = event.get("usage")
    return usage.get("completion_tokens") if isinstance(usage, dict) else None


class StreamFailed(Exception):
    """A request answered with an error status or an error event: counted, not fatal to the run."""


async def stream_one(client: httpx.AsyncClient, body: dict) -> StreamTiming:
    try:
        return await read_stream(client, body)
    except httpx.TransportError as exc:  # a reset or dropped connection: this request failed
        raise StreamFailed(f"{type(exc).__name__}: {exc}") from exc


async def read_stream(client: httpx.AsyncClient, body: dict) -> StreamTiming:
    timing = StreamTiming(sent=time.perf_counter())
    events, usage_tokens = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise StreamFailed(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise StreamFailed(f"error event: {event['error']}")
            usage_tokens = completion_tokens(event) or usage_tokens
            if any(choice.get("text") for choice in event.get("choices") or ()):
                timing.arrivals.append(time.perf_counter())
                events += 1
    timing.tokens = usage_tokens if usage_tokens is not None else events
    return timing


async def measure(url: str, model: str | None, concurrency: int, body: dict) -> Point:
    body = dict(body, **({"model": model} if model else {}))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        await stream_one(client, dict(body, max_tokens=2))  # warm the connection and the server
        cpu, start = time.process_time(), time.perf_counter()
        outcomes = await asyncio.gather(*(stream_one(client, body) for _ in range(concurrency)),
                                        return_exceptions=True)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    failures = [str(o) for o in outcomes if isinstance(o, StreamFailed)]
    unexpected = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, StreamFailed)]
    if unexpected:
        raise unexpected[0]  # a connection error or a bug: nothing to measure
    timings = [o for o in outcomes if isinstance(o, StreamTiming)]
    ttft = [t.arrivals[0] - t.sent for t in timings if t.arrivals]
    gaps = [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:])]
    return Point(sum(t.tokens for t in timings), seconds, ttft, gaps, cpu, failures)


async def model_id(url: str) -> str | None:
    """The first model the server lists (llama-server and Rivulet both answer /v1/models)."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        response = await client.get("/v1/models")
        if response.status_code != 200:
            return None
        data = response.json().get("data") or []
        return data[0].get("id") if data else None


def summarise(points: list[Point]) -> dict[str, float]:
    """Medians over rounds of each round's figures."""
    return {
        "tok/s": statistics.median(p.tokens_per_s for p in points),
        "ttft50": statistics.median(percentile(p.ttft_s, 50) for p in points) * 1000,
        "ttft99": statistics.median(percentile(p.ttft_s, 99) for p in points) * 1000,
        "itl50": statistics.median(percentile(p.gaps_s, 50) for p in points) * 1000,
        "itl99": statistics.median(percentile(p.gaps_s, 99) for p in points) * 1000,
        "cpu%": statistics.median(100 * p.client_cpu_s / p.seconds for p in points),
    }


async def run(args: argparse.Namespace) -> None:
    urls = [u.rstrip("/") for u in args.urls]
    models = {url: await model_id(url) for url in urls}
    body = {"prompt": args.prompt, "max_tokens": args.tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    print(f"{len(urls)} servers; {args.tokens} tokens a request, greedy, ignore_eos; median of {args.rounds} "
          f"rounds, servers alternating")
    for i, url in enumerate(urls):
        print(f"  [{i}] {url}  model {models[url]}")
    results: dict[tuple[str, int], list[Point]] = {}
    for concurrency in args.concurrency:
        for round_ in range(args.rounds):
            order = urls if round_ % 2 == 0 else urls[::-1]
            for url in order:
                point = await measure(url, models[url], concurrency, body)
                expected = concurrency * args.tokens
                if point.failures:
                    print(f"  warning: [{urls.index(url)}] C={concurrency}: {len(point.failures)} requests failed, "
                          f"the first: {point.failures[0]}")
                elif point.tokens != expected:
                    print(f"  warning: [{urls.index(url)}] streamed {point.tokens} tokens, expected {expected}")
                results.setdefault((url, concurrency), []).append(point)
                print(f"  C={concurrency} round {round_ + 1} [{urls.index(url)}]: {point.tokens_per_s:.1f} tok/s",
                      flush=True)
                await asyncio.sleep(args.pause)
    header = (f"{'C':>4} {'server':>6} {'tok/s':>8} {'ratio':>6} {'TTFT p50':>9} {'p99':>8} "
              f"{'ITL p50':>8} {'p99':>7} {'client CPU':>10}")
    print(header)
    for concurrency in args.concurrency:
        first = summarise(results[(urls[0], concurrency)])
        for i, url in enumerate(urls):
            s = summarise(results[(url, concurrency)])
            ratio = "" if i == 0 else f"{first['tok/s'] / s['tok/s']:.2f}x"
            print(f"{concurrency:>4} {f'[{i}]':>6} {s['tok/s']:>8.1f} {ratio:>6} {s['ttft50']:>7.0f}ms "
                  f"{s['ttft99']:>6.0f}ms {s['itl50']:>6.1f}ms {s['itl99']:>5.0f}ms {s['cpu%']:>9.0f}%")
    print("ratio: [0]'s tokens/s over that server's; TTFT from sending the request to its first text; "
          "ITL: gaps between text events")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", help="base URLs (the first one is compared with the others)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between points")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()

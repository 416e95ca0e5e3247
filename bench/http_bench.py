"""What streaming through the whole stack costs: the real server vs the engine alone, side by side.

    .venv/bin/python -m bench.http_bench /tmp/bench-512            # a checkpoint from make_checkpoint.py
    .venv/bin/python -m bench.http_bench models/demo --concurrency 1,8,32

For each concurrency C it sends C streaming ``/v1/completions`` requests at once to a real server
(``gunicorn -c gunicorn.conf.py wsgi:app`` on a free loopback port, gevent worker, engine thread), each a
16-token prompt and 128 generated tokens with ``ignore_eos``, and reads every event as a client would.
Then it runs C identical requests straight into an in-process ``Engine`` (no HTTP, no gevent). It prints,
per C: aggregate tokens/s both ways, their ratio (the share of the engine's speed a client sees through
HTTP and SSE), the ratio to C=1 through HTTP (what continuous batching gives), and the median time to
first token. Server, engine and clients share this machine's cores, so run it on an otherwise idle one.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from bench.engine_bench import run_batch
from models.config import LlamaConfig
from models.engine import Engine
from models.llm_backend import LlamaBackend
from tests.live_server import live_server


@dataclass(frozen=True)
class HttpResult:
    concurrency: int
    tokens: int
    seconds: float
    first_token_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def stream_one(url: str, body: dict, start: float, out: list, errors: list) -> None:
    """One client: POST, read the event stream to [DONE]. Appends (completion tokens, time to first token)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            errors.append(f"HTTP {response.status}: {response.read()[:200]!r}")
            return
        first_token_s, tokens, done = None, 0, False
        for raw in response:
            line = raw.decode("utf-8").rstrip("\n")
            done = done or line == "data: [DONE]"
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[len("data: "):])
            if "error" in payload:
                errors.append(payload["error"]["message"])
            elif payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
            elif first_token_s is None and payload["choices"][0]["text"]:
                first_token_s = time.perf_counter() - start
        if not done or tokens != body["max_tokens"]:
            errors.append(f"a stream ended after {tokens} of {body['max_tokens']} tokens (done: {done})")
        out.append((tokens, first_token_s or 0.0))
    finally:
        connection.close()


def run_http(url: str, concurrency: int, args: argparse.Namespace, rng: random.Random) -> HttpResult:
    bodies = [{
        "prompt": [1] + [rng.randrange(3, args.vocab) for _ in range(args.prompt_tokens - 1)],
        "max_tokens": args.tokens, "temperature": args.temperature, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    } for _ in range(concurrency)]
    out: list[tuple[int, float]] = []
    errors: list[str] = []
    start = time.perf_counter()
    clients = [threading.Thread(target=stream_one, args=(url, body, start, out, errors)) for body in bodies]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    seconds = time.perf_counter() - start
    if errors or len(out) != concurrency:
        raise SystemExit(f"concurrency {concurrency}: requests failed: {errors[:3]}")
    return HttpResult(concurrency, sum(t for t, _ in out), seconds, [f for _, f in out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="an HF-layout directory (bench/make_checkpoint.py)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (server and engine alike)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    config: LlamaConfig = LlamaBackend(args.checkpoint, torch.device("cpu"), max_batch=1).config
    args.vocab = config.vocab_size
    if args.prompt_tokens + args.tokens > config.max_position_embeddings:
        raise SystemExit("--prompt-tokens + --tokens must fit the checkpoint's context")

    env = {"RIVULET_MODEL": str(args.checkpoint.resolve()), "RIVULET_DEVICE": args.device,
           "RIVULET_MAX_BATCH": str(max(levels)), "RIVULET_MAX_WAITING": str(max(levels)),
           "RIVULET_REQUEST_TIMEOUT_S": "3600"}
    with tempfile.TemporaryDirectory() as logs, live_server(env, log_dir=Path(logs)) as server:
        rng = random.Random(0)
        run_http(server.url, min(levels), argparse.Namespace(**{**vars(args), "tokens": 8}), rng)  # warm-up
        http_results = [run_http(server.url, c, args, rng) for c in levels]

    backend = LlamaBackend(args.checkpoint, torch.device(args.device), max_batch=max(levels))
    engine = Engine(backend, max_batch=max(levels), max_waiting=max(levels))
    thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    thread.start()
    while engine.state == "starting":
        time.sleep(0.05)
    rng = random.Random(0)
    try:
        run_batch(engine, min(levels), argparse.Namespace(**{**vars(args), "tokens": 8}), rng)  # warm-up
        engine_results = [run_batch(engine, c, args, rng) for c in levels]
    finally:
        engine.shutdown()
        thread.join()

    print(f"checkpoint {args.checkpoint} ({config.hidden_size} wide, {config.num_hidden_layers} layers), "
          f"{args.device}, "
          f"{args.prompt_tokens} prompt + {args.tokens} generated tokens per request, temperature {args.temperature}")
    print(f"{'clients':>7}  {'HTTP tok/s':>10}  {'engine tok/s':>12}  {'HTTP/engine':>11}  "
          f"{'HTTP vs ' + str(levels[0]):>10}  {'median TTFT':>11}")
    base = http_results[0].tokens_per_s
    for h, e in zip(http_results, engine_results):
        print(f"{h.concurrency:>7}  {h.tokens_per_s:>10.1f}  {e.tokens_per_s:>12.1f}  "
              f"{h.tokens_per_s / e.tokens_per_s:>10.2f}x  {h.tokens_per_s / base:>9.1f}x  "
              f"{statistics.median(h.first_token_s) * 1000:>8.0f} ms")


if __name__ == "__main__":
    main()

"""Time to first token of a prompt that shares a system prompt with the requests running, with prefix
caching and without, side by side.

    python -m bench.make_checkpoint bench-512 /tmp/bench-512
    python -m bench.prefix_bench /tmp/bench-512 --streams 8 --system-tokens 1000

``--streams`` requests decode on the real engine, each prompt a ``--system-tokens`` system prompt (the
same for all) and a few tokens of its own. Once all of them generate, a new request with the same
system prompt and a question of its own arrives; its time to first token is measured (it asks for one
token, so its end is its first token). Each round runs both ways in turn, on a fresh engine:
``RIVULET_PREFIX_CACHING`` on (the new prompt copies a running row's cached system prompt and computes
only its question) and off (it computes the whole prompt). Prints the medians and their ratio.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.prefill_stall_bench import GapSink, request, wait_until, with_context
from models.engine import Engine
from models.llm_backend import LlamaBackend


def time_to_first_token(checkpoint: Path, args: argparse.Namespace, *, prefix_caching: bool,
                        system: list[int], vocab: int) -> tuple[float, int]:
    """-> (the new request's time to first token, prompt tokens the runner did not compute)."""
    backend = LlamaBackend(checkpoint, torch.device("cpu"), args.streams + 2, args.context, args.chunk,
                           prefix_caching=prefix_caching)
    engine = Engine(backend, max_batch=args.streams + 2, max_waiting=args.streams + 4, torch_threads=args.threads)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    rng = random.Random(1)
    try:
        while engine.state == "starting":
            time.sleep(0.01)
        sinks = [GapSink() for _ in range(args.streams)]
        for sink in sinks:
            engine.submit(request(system + [rng.randrange(3, vocab) for _ in range(8)], args.tokens), sink)
        wait_until(lambda: all(s.times or s.ended_at for s in sinks), "the running streams to decode")
        if engine.error is not None:
            raise SystemExit(f"the engine failed: {engine.error}")
        arriving = GapSink()
        started = time.perf_counter()
        engine.submit(request(system + [rng.randrange(3, vocab) for _ in range(args.question_tokens)], 1), arriving)
        wait_until(lambda: arriving.ended_at, "the new request's first token")
        return arriving.ended_at - started, backend.runner.prefix_tokens_reused
    finally:
        engine.shutdown()
        thread.join(60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--streams", type=int, default=8, help="requests running when the new one comes")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--question-tokens", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=2000, help="each running stream's max_tokens")
    parser.add_argument("--chunk", type=int, default=256, help="RIVULET_PREFILL_CHUNK_TOKENS")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = with_context(args.checkpoint, args.context, Path(scratch))
        vocab = LlamaBackend(checkpoint, torch.device("cpu"), 1).config.vocab_size
        rng = random.Random(0)
        system = [1] + [rng.randrange(3, vocab) for _ in range(args.system_tokens - 1)]
        ways = {"prefix caching": True, "no prefix caching": False}
        ttfts: dict[str, list[float]] = {name: [] for name in ways}
        reused: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, on in ways.items():  # in turn, so a busy moment of the machine hits both
                ttft, reused[name] = time_to_first_token(checkpoint, args, prefix_caching=on, system=system,
                                                         vocab=vocab)
                ttfts[name].append(ttft)
    print(f"{args.streams} streams running with a {args.system_tokens}-token system prompt; a request with it "
          f"and a {args.question_tokens}-token question arrives; median of {args.rounds} rounds")
    print(f"{'way':<20}{'TTFT ms':>10}{'tokens copied':>15}")
    medians = {name: statistics.median(values) for name, values in ttfts.items()}
    for name in ways:
        print(f"{name:<20}{medians[name] * 1000:>10.1f}{reused[name]:>15}")
    print(f"time to first token without / with prefix caching: "
          f"{medians['no prefix caching'] / medians['prefix caching']:.2f}x")


if __name__ == "__main__":
    main()

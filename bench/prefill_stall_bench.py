"""How much a long prompt arriving mid-generation slows the streams already running, chunked or not.

    python -m bench.make_checkpoint bench-512 /tmp/bench-512
    python -m bench.prefill_stall_bench /tmp/bench-512 --streams 32 --prompt-tokens 2000

``--streams`` requests decode on the real engine (its own thread, as in the server); once all of them
are generating, one request with a ``--prompt-tokens`` prompt arrives. Each running stream's gaps
between tokens are recorded for a window around that arrival and compared with the same streams'
gaps without the long prompt. It runs three ways in turn, ``--rounds`` times, keeping medians: no long
prompt (the baseline), the long prompt prefilled in one pass (``RIVULET_PREFILL_CHUNK_TOKENS=0``), and
in chunks of at most ``--chunk`` tokens, each sized by the engine from measured step times
(``models/chunk_budget.py``). It prints each way's inter-token p50/p99 and the ratio of p99 to the
baseline's (issue 11 asks for at most 2x with chunks), and the long prompt's time to first token.

The checkpoint's context must hold the long prompt; ``--context`` raises a checkpoint's own
(rotary positions need no table: the config's ``max_position_embeddings`` is rewritten in a copy).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from models.api import Finished, GenerationRequest, SamplingParams, TextDelta
from models.engine import Engine
from models.llm_backend import LlamaBackend


class GapSink:
    """One running stream: when each of its text deltas arrived, and when it ended."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ended_at: float | None = None

    def put(self, event) -> None:
        if isinstance(event, TextDelta):
            self.times.append(time.perf_counter())
        elif isinstance(event, Finished):
            self.ended_at = time.perf_counter()


def wait_until(condition, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.001)


def with_context(checkpoint: Path, context: int, scratch: Path) -> Path:
    """A copy of ``checkpoint`` (links to its files) whose config allows ``context`` tokens."""
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("max_position_embeddings", 0) >= context:
        return checkpoint
    target = scratch / "long-context"
    target.mkdir()
    for source in checkpoint.iterdir():
        if source.name != "config.json":
            (target / source.name).symlink_to(source.resolve())
    config["max_position_embeddings"] = context
    (target / "config.json").write_text(json.dumps(config))
    return target


def request(prompt: list[int], tokens: int) -> GenerationRequest:
    return GenerationRequest(uuid.uuid4().hex, prompt, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                      ignore_eos=True), time.monotonic() + 3600)


def run_once(checkpoint: Path, args: argparse.Namespace, *, long_prompt: bool, chunk: int) -> tuple[list[float], float]:
    """-> (the running streams' gaps in the window, the long prompt's time to first token or 0)."""
    backend = LlamaBackend(checkpoint, torch.device("cpu"), args.streams + 1, args.context, chunk)
    engine = Engine(backend, max_batch=args.streams + 1, max_waiting=args.streams + 4, torch_threads=args.threads)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        while engine.state == "starting":
            time.sleep(0.01)
        sinks = [GapSink() for _ in range(args.streams)]
        for i, sink in enumerate(sinks):
            engine.submit(request([1, 10 + i, 20 + i, 30 + i], args.tokens), sink)
        wait_until(lambda: all(len(s.times) >= args.warmup or s.ended_at for s in sinks), "the streams to decode")
        window_start = time.perf_counter()
        ttft = 0.0
        if long_prompt:
            first = GapSink()
            vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
            prompt = [1] + [(7 * i) % (vocab - 3) + 3 for i in range(args.prompt_tokens - 1)]  # ids the model has
            engine.submit(request(prompt, 4), first)
            wait_until(lambda: first.times or first.ended_at, "the long prompt's first token")
            ttft = (first.times[0] if first.times else first.ended_at) - window_start
        window_end = max(time.perf_counter(), window_start + args.window)
        while time.perf_counter() < window_end:
            time.sleep(0.005)
        if engine.error is not None:  # numbers from a failed engine would read as a stall
            raise SystemExit(f"the engine failed: {engine.error}")
        gaps = [b - a for s in sinks for a, b in zip(s.times, s.times[1:]) if window_start <= b <= window_end]
        return gaps, ttft
    finally:
        engine.shutdown()
        thread.join(60)


def percentile(values: list[float], q: float) -> float:
    if not values:
        raise SystemExit("no token arrived in the measured window: the engine failed or --window is too short")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--streams", type=int, default=32, help="requests decoding when the long prompt comes")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=256, help="RIVULET_PREFILL_CHUNK_TOKENS of the chunked way")
    parser.add_argument("--tokens", type=int, default=1000, help="each running stream's max_tokens")
    parser.add_argument("--warmup", type=int, default=5, help="tokens every stream has before the prompt comes")
    parser.add_argument("--window", type=float, default=2.0, help="seconds of gaps measured (at least)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    ways = [("no long prompt", False, args.chunk), ("one pass", True, 0), (f"chunks up to {args.chunk}", True, args.chunk)]
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = with_context(args.checkpoint, args.context, Path(scratch))
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in ways}
        for _ in range(args.rounds):
            for name, long_prompt, chunk in ways:  # in turn, so a busy moment of the machine hits all ways
                gaps, ttft = run_once(checkpoint, args, long_prompt=long_prompt, chunk=chunk)
                runs[name].append((percentile(gaps, 50), percentile(gaps, 99), ttft))
    baseline_p99 = statistics.median(r[1] for r in runs[ways[0][0]])
    print(f"{args.streams} streams decoding; a {args.prompt_tokens}-token prompt arrives; median of {args.rounds} rounds")
    print(f"{'way':<18}{'ITL p50 ms':>12}{'ITL p99 ms':>12}{'p99 vs none':>13}{'long TTFT ms':>14}")
    for name, long_prompt, _ in ways:
        p50 = statistics.median(r[0] for r in runs[name]) * 1000
        p99 = statistics.median(r[1] for r in runs[name]) * 1000
        ttft = statistics.median(r[2] for r in runs[name]) * 1000
        print(f"{name:<18}{p50:>12.1f}{p99:>12.1f}{p99 / (baseline_p99 * 1000):>12.2f}x"
              f"{(f'{ttft:.0f}' if long_prompt else '-'):>14}")


if __name__ == "__main__":
    main()

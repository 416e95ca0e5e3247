"""Aggregate decoding throughput of the real engine at several batch sizes, in one run.

    python -m bench.make_checkpoint bench-512 /tmp/bench-512
    python -m bench.engine_bench /tmp/bench-512

For each batch size B it submits B requests at once to an ``Engine`` running on its own thread (as in
the server), each generating ``--tokens`` tokens with ``ignore_eos``, and measures from the first
submit to the last ``Finished``: prefill, sampling, detokenization and the engine loop included.
The batch sizes are run ``--repeat`` times in turn and each size's median run is kept, so a burst of
other work on the machine does not land on one size only. It prints tokens/s summed over the batch and
the ratio to batch 1.
"""
from __future__ import annotations

import os

# As gunicorn.conf.py sets it for the server: huge pages for torch's large CPU tensors.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from models.api import Finished, GenerationRequest, SamplingParams
from models.cpus import usable_cpus
from models.engine import Engine
from models.llm_backend import LlamaBackend


class CountdownSink:
    """Shared by a batch's requests: counts their ends and completion tokens."""

    def __init__(self, expected: int) -> None:
        self.remaining = expected
        self.tokens = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()

    def put(self, event) -> None:
        if not isinstance(event, Finished):
            return
        with self.lock:
            self.tokens += event.completion_tokens
            if event.reason != "length":
                self.errors.append(f"{event.reason}: {event.error}")
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()


@dataclass(frozen=True)
class Result:
    batch: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_batch(engine: Engine, batch: int, args: argparse.Namespace, rng: random.Random) -> Result:
    sampling = SamplingParams(max_tokens=args.tokens, temperature=args.temperature, ignore_eos=True)
    sink = CountdownSink(batch)
    start = time.perf_counter()
    for _ in range(batch):
        prompt = [1] + [rng.randrange(3, args.vocab) for _ in range(args.prompt_tokens - 1)]
        engine.submit(GenerationRequest(uuid.uuid4().hex, prompt, sampling, time.monotonic() + 3600), sink)
    if not sink.done.wait(timeout=3600):
        raise SystemExit(f"batch {batch} did not finish")
    seconds = time.perf_counter() - start
    if sink.errors:
        raise SystemExit(f"batch {batch}: requests failed: {sink.errors[:3]}")
    return Result(batch, sink.tokens, seconds)


def median_run(runs: list[Result]) -> Result:
    return sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]



def start_engine(engine: Engine) -> threading.Thread:
    """Run ``engine`` on its own thread, as the server does, and wait until it is ready (exits if it fails)."""
    thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    thread.start()
    while engine.state == "starting":
        time.sleep(0.05)
    if not engine.ready:
        raise SystemExit(f"the engine did not start: {engine.error}")
    return thread

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="an HF-layout directory (bench/make_checkpoint.py)")
    parser.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on the engine thread (default: the engine's, CPUs - 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the batch sizes; the median is kept")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="decode steps eager on CUDA (RIVULET_CUDA_GRAPHS=0): models/cuda_graphs.py")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    backend = LlamaBackend(args.checkpoint, torch.device(args.device), max_batch=max(batches),
                           cuda_graphs=not args.no_cuda_graphs)
    args.vocab = backend.tokenizer.vocab_size
    engine = Engine(backend, max_batch=max(batches), max_waiting=max(batches), torch_threads=args.threads)
    thread = start_engine(engine)
    rng = random.Random(0)
    try:
        run_batch(engine, min(batches), argparse.Namespace(**{**vars(args), "tokens": 8}), rng)  # warm-up
        rounds = [[run_batch(engine, b, args, rng) for b in batches] for _ in range(args.repeat)]
        results = [median_run([r[i] for r in rounds]) for i in range(len(batches))]
    finally:
        engine.shutdown()
        thread.join()

    c = backend.config
    print(f"checkpoint {args.checkpoint} ({c.hidden_size} wide, {c.num_hidden_layers} layers, "
          f"{c.num_attention_heads} heads, {c.intermediate_size} hidden, {c.vocab_size} vocab)")
    print(f"device {args.device}, torch threads {engine.torch_threads} of {usable_cpus()} CPUs, "
          f"{args.prompt_tokens} prompt + {args.tokens} generated tokens per request, "
          f"temperature {args.temperature}, median of {args.repeat} rounds")
    base = results[0].tokens_per_s
    print(f"{'batch':>5}  {'tokens':>6}  {'seconds':>7}  {'tokens/s':>8}  {'vs batch ' + str(batches[0]):>10}")
    for r in results:
        print(f"{r.batch:>5}  {r.tokens:>6}  {r.seconds:>7.2f}  {r.tokens_per_s:>8.1f}  {r.tokens_per_s / base:>9.1f}x")


if __name__ == "__main__":
    main()

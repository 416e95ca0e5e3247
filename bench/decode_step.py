"""The engine's batch-1 decode step with CUDA graphs and without, against the memory-bandwidth floor.

    .venv/bin/python -m bench.decode_step /tmp/tinyllama-shape --device cuda              # H100 or H200
    .venv/bin/python -m bench.decode_step /tmp/tinyllama-shape --device cuda --bandwidth 2.0e12

Twice (eager, RIVULET_CUDA_GRAPHS=0, then with the graphs) it starts the real ``Engine`` on its own thread,
as the server does, runs one greedy request of ``--tokens`` tokens (``ignore_eos``) to warm up (every graph
it needs is captured then), then the same again, timing each decode step the backend executes
(``LlamaBackend.execute``: the forward pass, sampling and the read-back of the sampled token; not the
scheduler or detokenization). It prints each mode's median step, their ratio, and the floor: the bytes of
weights a step reads (every projection and the LM head; the embedding rows and the KV cache, a few MB at
these lengths, are left out) over the device's memory bandwidth. The goal (the CUDA graphs issue) is a
graphed step within 2x of that floor.

The bandwidth is ``--bandwidth`` in bytes/s, else ``GPU_BANDWIDTH``, else the datasheet figure for the
device's name: 4.8e12 for an H200, 3.35e12 for an H100 SXM (an H100 PCIe has 2.0e12: pass it). On a CPU the
graphs do not apply and both runs are eager; the script still runs (tests/models/test_bench.py).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.engine_bench import run_batch, start_engine
from models.checkpoint import load_config
from models.cpu_weights import projection_bytes
from models.cuda_graphs import GraphedDecode
from models.engine import Engine
from models.llm_backend import LlamaBackend

# Datasheet memory bandwidth, bytes/s, by a substring of torch.cuda.get_device_name(); the first match wins.
KNOWN_BANDWIDTHS = (("H200", 4.8e12), ("H100", 3.35e12))


class StepTimedBackend(LlamaBackend):
    """The real backend, noting how long each plain decode step takes (no prefill or prompt chunk in it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_seconds: list[float] = []

    def execute(self, batch):
        started = time.perf_counter()
        outputs = super().execute(batch)
        if batch.decode and not batch.prefill and batch.chunk is None:
            self.step_seconds.append(time.perf_counter() - started)
        return outputs


def known_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bandwidth for key, bandwidth in KNOWN_BANDWIDTHS if key in name), None)


@dataclass(frozen=True)
class StepRun:
    seconds: float  # the median decode step
    weight_bytes: int  # what a step reads of the weights
    dtype: torch.dtype
    graphs: str  # what the CUDA graphs did


def graphs_note(graphs: GraphedDecode | None) -> str:
    if graphs is None:
        return "CUDA graphs do not apply on this device: both runs are eager"
    if graphs.error is not None:
        return f"CUDA graphs failed, the run fell back to eager: {graphs.error}"
    return f"CUDA graphs served {graphs.steps} steps ({len(graphs.graphs)} graphs captured)"


def median_step(args: argparse.Namespace, device: torch.device, cuda_graphs: bool) -> StepRun:
    """The median decode step of one request, after a warm-up request of the same length."""
    backend = StepTimedBackend(args.checkpoint, device, max_batch=1, cuda_graphs=cuda_graphs)
    engine = Engine(backend, max_batch=1, max_waiting=1)
    thread = start_engine(engine)
    rng = random.Random(0)
    try:
        run_batch(engine, 1, args, rng)  # warm-up: kernels chosen, every key bucket's graph captured
        backend.step_seconds.clear()
        run_batch(engine, 1, args, rng)
        runner = backend.runner  # closing the engine drops it
        run = StepRun(statistics.median(backend.step_seconds), projection_bytes(runner.model),
                      runner.model.lm_head.weight.dtype, graphs_note(runner.graphed))
    finally:
        engine.shutdown()
        thread.join()
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="an HF-layout directory (bench/make_checkpoint.py)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=256, help="generated tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="memory bandwidth, bytes/s (default: GPU_BANDWIDTH, else H200 4.8e12, H100 3.35e12)")
    args = parser.parse_args(argv)
    args.temperature = 0.0
    device = torch.device(args.device)
    config = load_config(args.checkpoint)
    args.vocab = config.vocab_size
    if args.prompt_tokens + args.tokens > config.max_position_embeddings:
        raise SystemExit("--prompt-tokens + --tokens must fit the checkpoint's context")
    bandwidth = args.bandwidth or float(os.environ.get("GPU_BANDWIDTH") or 0) or known_bandwidth(device)

    eager = median_step(args, device, cuda_graphs=False)
    graphed = median_step(args, device, cuda_graphs=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"checkpoint {args.checkpoint} ({config.hidden_size} wide, {config.num_hidden_layers} layers, "
          f"{config.vocab_size} vocab, {str(graphed.dtype).removeprefix('torch.')}), {name}, batch 1, "
          f"{args.prompt_tokens} prompt + {args.tokens} greedy tokens, median decode step")
    print(graphed.graphs)
    print(f"{'mode':>6}  {'step ms':>8}  {'tokens/s':>8}")
    for mode, run in (("eager", eager), ("graphs", graphed)):
        print(f"{mode:>6}  {run.seconds * 1000:>8.3f}  {1 / run.seconds:>8.1f}")
    print(f"graphs vs eager: {eager.seconds / graphed.seconds:.2f}x faster a step")
    weights = graphed.weight_bytes
    if bandwidth:
        floor = weights / bandwidth
        print(f"floor: {weights / 1e9:.2f} GB of weights / {bandwidth / 1e12:.2f} TB/s = {floor * 1000:.3f} ms; "
              f"graphed step {graphed.seconds / floor:.2f}x the floor, eager {eager.seconds / floor:.2f}x "
              "(goal: within 2x)")
    else:
        print(f"floor: {weights / 1e9:.2f} GB of weights / an unknown bandwidth (pass --bandwidth or GPU_BANDWIDTH)")


if __name__ == "__main__":
    main()

"""Where one decode step's time goes, at a given batch size: forward pass, sampling, detokenization.

    .venv/bin/python -m bench.profile_step /tmp/bench-512                 # batch 1, greedy
    .venv/bin/python -m bench.profile_step /tmp/bench-512 --batch 16 --threads 2 --ops 15

Drives a ``LlamaRunner`` directly (no engine thread, no HTTP): prefills ``--batch`` sequences, then runs
``--steps`` decode steps, timing separately the model's forward pass, the sampler and the sequences'
detokenization (``Sequence.append``). Then it runs the same steps under ``torch.profiler`` and prints
the ops that took the most CPU time. The median step is reported, so a burst of other work on the
machine does not distort it much.
"""
from __future__ import annotations

import os

# As gunicorn.conf.py sets it for the server: huge pages for torch's large CPU tensors.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import random
import statistics
import time
import uuid
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from models.api import GenerationRequest, SamplingParams
from models.checkpoint import load_model
from models.cpus import usable_cpus
from models.llm_backend import load_tokenizer
import models.runner as runner_module
from models.runner import LlamaRunner
from models.sequence import Sequence


def timed(fn, into: list[float]):
    start = time.perf_counter()
    out = fn()
    into.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=None, help="fixed torch threads (default: the runner's)")
    parser.add_argument("--ops", type=int, default=12, help="profiler rows to print")
    parser.add_argument("--shapes", action="store_true", help="profiler rows per op and input shapes")
    parser.add_argument("--compile", action="store_true", help="the decode step through torch.compile (RIVULET_COMPILE)")
    parser.add_argument("--no-packed", action="store_true",
                        help="no prepacked weights (RIVULET_PACKED_WEIGHTS=0): models/cpu_weights.py")
    parser.add_argument("--no-native", action="store_true",
                        help="no native C kernels (RIVULET_NATIVE_KERNELS=0): models/native_build.py")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = load_model(args.checkpoint, torch.device("cpu"))
    tokenizer = load_tokenizer(args.checkpoint)
    max_seq = args.prompt_tokens + 2 * args.steps + 8
    torch.set_num_threads(max(1, usable_cpus() - 1))  # what the engine thread starts from
    runner = LlamaRunner(model, args.batch, max_seq, compile_decode=args.compile, packed_weights=not args.no_packed,
                         native_kernels=not args.no_native)
    if args.threads:
        torch.set_num_threads(args.threads)
        runner.thread_policy = None  # keep it fixed
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=10 ** 6, temperature=args.temperature, ignore_eos=True)
    seqs = []
    for _ in range(args.batch):
        prompt = [1] + [rng.randrange(3, tokenizer.vocab_size) for _ in range(args.prompt_tokens - 1)]
        request = GenerationRequest(uuid.uuid4().hex, prompt, sampling, time.monotonic() + 3600)
        seqs.append(Sequence(request, tokenizer, frozenset(), max_seq))
    with torch.inference_mode():
        for result in runner.prefill(seqs):
            result.seq.append(result.token)
        forward, sample, detok, total = [], [], [], []
        real_sample = runner_module.sample

        def sample_timed(*a, **kw):
            return timed(lambda: real_sample(*a, **kw), sample)

        runner_module.sample = sample_timed
        for _ in range(args.steps):
            start = time.perf_counter()
            results = runner.decode()
            mid = time.perf_counter()
            for result in results:
                result.seq.append(result.token)
            end = time.perf_counter()
            total.append(end - start)
            forward.append(mid - start - sample[-1])
            detok.append(end - mid)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            for _ in range(min(args.steps, 16)):
                for result in runner.decode():
                    result.seq.append(result.token)
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"batch {args.batch}, torch threads {torch.get_num_threads()}, median of {args.steps} steps"
          f"{', compiled' if runner.compiled is not None and runner.compiled.steps else ''}"
          f"{', compiled ahead of time' if runner.exported is not None and runner.exported.steps else ''}"
          f"{', native one-row step' if runner.native_step is not None and runner.native_step.steps else ''}"
          f"{', native attention' if runner.model.native_attention and args.batch > 1 else ''}"
          f"{'' if args.no_packed else ', packed weights'}")
    print(f"  step           {ms(total):7.2f} ms  ({args.batch / statistics.median(total):.0f} tokens/s)")
    print(f"  forward        {ms(forward):7.2f} ms")
    print(f"  sampling       {ms(sample):7.2f} ms")
    print(f"  detokenization {ms(detok):7.2f} ms")
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total",
                                                                  row_limit=args.ops))


if __name__ == "__main__":
    main()

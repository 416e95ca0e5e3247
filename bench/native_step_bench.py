"""The native decode step (models/native_step.py) against torch's, engine alone, side by side.

    .venv/bin/python -m bench.native_step_bench /tmp/bench-512
    .venv/bin/python -m bench.native_step_bench /tmp/bench-512 --batches 16,64 --keys 30,160

One model, laid out as a runner lays it out where the native step serves (weights as loaded, with the
oneDNN packed copy torch's batched products use), its cache rows filled to ``--keys`` positions. For each
batch size and key count, the two steps alternate in rounds (``--rounds``, ``--steps`` steps each) and
the median step time of each is printed with their ratio. Both write the same cache positions, so each
round starts from the same state. Torch's step is ``Llama.decode`` as the runner calls it without the
native kernels' step: eager, its attention through the native ragged kernel (what a step carrying a
prompt's chunk still runs).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from models import native_build, native_step
from models.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--keys", default="30,160", help="cached positions per row before the step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if native_build.load() is None:
        raise SystemExit(f"the native kernels did not load: {native_build.load_error}")
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    key_counts = [int(k) for k in args.keys.split(",")]
    model = load_model(args.checkpoint, torch.device("cpu"), torch.float32)
    model.setup_cache(max(batches), max(key_counts) + 1)
    model.fuse_projections()
    model.lay_out_for_cpu(pack=True, transposed=False)
    model.use_native_attention()
    step = native_step.bind(model)
    if step is None:
        raise SystemExit("the native step does not take this model")
    generator = torch.Generator().manual_seed(0)
    print(f"{args.checkpoint.name}, {args.threads} threads, median of {args.rounds} rounds of {args.steps} steps")
    print("| batch | keys | torch ms | native ms | torch / native |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for keys in key_counts:
            prompt = torch.randint(3, model.config.vocab_size, (max(batches), keys), generator=generator)
            model.prefill(prompt, torch.arange(max(batches)), torch.full((max(batches),), keys))
            for batch in batches:
                tokens = torch.randint(3, model.config.vocab_size, (batch,), generator=generator)
                positions = torch.full((batch,), keys)
                token_list, position_list = tokens.tolist(), positions.tolist()

                def native() -> None:
                    if batch == 1:
                        step(token_list[0], position_list[0])
                    else:
                        step.rows(token_list, position_list)

                def eager() -> None:
                    model.decode(tokens, positions, keys + 1, ragged=False)

                times: dict[str, list[float]] = {"torch": [], "native": []}
                for _ in range(args.rounds):
                    for name, run in (("torch", eager), ("native", native)):
                        started = time.perf_counter()
                        for _ in range(args.steps):
                            run()
                        times[name].append((time.perf_counter() - started) / args.steps * 1e3)
                eager_ms, native_ms = statistics.median(times["torch"]), statistics.median(times["native"])
                print(f"| {batch} | {keys} | {eager_ms:.2f} | {native_ms:.2f} | {eager_ms / native_ms:.2f} |")


if __name__ == "__main__":
    main()

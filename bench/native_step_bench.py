"""The native decode step (models/native_step.py) against torch's, engine alone, side by side.

    .venv/bin/python -m bench.native_step_bench /tmp/bench-512
    .venv/bin/python -m bench.native_step_bench /tmp/bench-512 --batches 16,64 --keys 30,160
    .venv/bin/python -m bench.native_step_bench /tmp/bench-512 --int8


One model, laid out as a runner lays it out where the native step serves (weights as loaded, with the
oneDNN packed copy torch's batched products use), its cache rows filled to ``--keys`` positions. For each
batch size and key count, the two steps alternate in rounds (``--rounds``, ``--steps`` steps each) and
the median step time of each is printed with their ratio. Both write the same cache positions, so each
round starts from the same state. Torch's step is ``Llama.decode`` as the runner calls it without the
native kernels' step: eager, its attention through the native ragged kernel (what a step carrying a
prompt's chunk still runs).

``--int8``: a third step, the native one reading int8 weights (RIVULET_QUANT=int8, models/quantize.py),
bound after the first two; the model's weights then hold the int8 values, which the fp32 steps read at
the same speed as before.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from models import native_build, native_step
from models.checkpoint import load_model
from models.quantize import quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--keys", default="30,160", help="cached positions per row before the step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--int8", action="store_true", help="also the native step over int8 weights")
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
    int8_step = None
    if args.int8:
        quantize_model(model)
        int8_step = native_step.bind(model)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.checkpoint.name}, {args.threads} threads, median of {args.rounds} rounds of {args.steps} steps")
    if int8_step is None:
        print("| batch | keys | torch ms | native ms | torch / native |")
        print("|---|---|---|---|---|")
    else:
        print("| batch | keys | torch ms | native ms | native int8 ms | torch / native | native / int8 |")
        print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for keys in key_counts:
            prompt = torch.randint(3, model.config.vocab_size, (max(batches), keys), generator=generator)
            model.prefill(prompt, torch.arange(max(batches)), torch.full((max(batches),), keys))
            for batch in batches:
                tokens = torch.randint(3, model.config.vocab_size, (batch,), generator=generator)
                positions = torch.full((batch,), keys)
                token_list, position_list = tokens.tolist(), positions.tolist()

                def native(step: native_step.NativeStep = step) -> None:
                    if batch == 1:
                        step(token_list[0], position_list[0])
                    else:
                        step.rows(token_list, position_list)

                def eager() -> None:
                    model.decode(tokens, positions, keys + 1, ragged=False)

                runs = [("torch", eager), ("native", native)]
                if int8_step is not None:
                    runs.append(("int8", lambda: native(int8_step)))
                times: dict[str, list[float]] = {name: [] for name, _ in runs}
                for _ in range(args.rounds):
                    for name, run in runs:
                        started = time.perf_counter()
                        for _ in range(args.steps):
                            run()
                        times[name].append((time.perf_counter() - started) / args.steps * 1e3)
                eager_ms, native_ms = statistics.median(times["torch"]), statistics.median(times["native"])
                if int8_step is None:
                    print(f"| {batch} | {keys} | {eager_ms:.2f} | {native_ms:.2f} | {eager_ms / native_ms:.2f} |")
                else:
                    int8_ms = statistics.median(times["int8"])
                    print(f"| {batch} | {keys} | {eager_ms:.2f} | {native_ms:.2f} | {int8_ms:.2f} | "
                          f"{eager_ms / native_ms:.2f} | {native_ms / int8_ms:.2f} |")


if __name__ == "__main__":
    main()

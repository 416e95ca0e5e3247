"""The native decode step from weights as loaded against the same weights held in 2 MiB pages
(models/huge_pages.py), engine alone, side by side in one process.

    .venv/bin/python -m bench.huge_pages_bench /tmp/bench-512
    .venv/bin/python -m bench.huge_pages_bench /tmp/bench-512 --int8 --batches 1,4

Two copies of one model, laid out as a runner lays it out where the native step serves (``--int8``: as
RIVULET_QUANT=int8 keeps it, int8 rows only), one moved into memory advised for 2 MiB pages. For each batch
size their steps alternate in rounds (``--rounds``, ``--steps`` steps each, ``--keys`` cached positions
per row); the median step time of each is printed with their ratio.

The other copy is left as a server left it before: torch's allocator asked for 2 MiB pages for its own
allocations of 2 MiB and more (``THP_MEM_ALLOC_ENABLE=1``, which gunicorn.conf.py sets, and so does this
script unless the environment says otherwise: the fused projections, made at load), and the rest stayed in
4 KiB pages (the matrices read from the checkpoint file's mapping, those under 2 MiB). With
``THP_MEM_ALLOC_ENABLE=0`` that copy is all in 4 KiB pages.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch's first large allocation, as gunicorn.conf.py

import torch  # noqa: E402

from models import huge_pages, native_build, native_step  # noqa: E402
from models.checkpoint import load_model  # noqa: E402
from models.llama import Llama  # noqa: E402
from models.quantize import quantize_model  # noqa: E402


def laid_out(checkpoint: Path, batch: int, keys: int, int8: bool) -> Llama:
    model = load_model(checkpoint, torch.device("cpu"), torch.float32)
    model.setup_cache(batch, keys + 1)
    model.fuse_projections()
    if int8:
        quantize_model(model)
    model.lay_out_for_cpu(pack=False, transposed=False)
    model.use_native_attention()
    if int8:
        native_step.keep_only_int8(model, native_build.load())
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--keys", type=int, default=100, help="cached positions per row before the step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--int8", action="store_true", help="int8 rows only, as RIVULET_QUANT=int8 keeps them")
    args = parser.parse_args(argv)
    if native_build.load() is None:
        raise SystemExit(f"the native kernels did not load: {native_build.load_error}")
    if not huge_pages.available():
        raise SystemExit(f"no transparent huge pages here ({huge_pages.THP_MODE})")
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    as_loaded = laid_out(args.checkpoint, max(batches), args.keys, args.int8)
    held = laid_out(args.checkpoint, max(batches), args.keys, args.int8)
    moved = huge_pages.hold_in_huge_pages(held)
    if not moved:
        raise SystemExit(f"nothing moved: every tensor is under {huge_pages.SMALLEST // 1024} KiB")
    steps = {"as loaded": native_step.bind(as_loaded), "2 MiB": native_step.bind(held)}
    if None in steps.values():
        raise SystemExit("the native step does not take this model")
    print(f"{args.checkpoint.name}{' int8' if args.int8 else ''}, {moved / 2**20:.1f} MiB moved, {args.threads} "
          f"threads, {args.keys} keys, median of {args.rounds} rounds of {args.steps} steps")
    print("| batch | as loaded ms | in 2 MiB pages ms | as loaded / 2 MiB |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for batch in batches:
            tokens, positions = list(range(5, 5 + batch)), [args.keys] * batch
            times: dict[str, list[float]] = {name: [] for name in steps}
            for round_ in range(args.rounds):
                order = list(steps.items()) if round_ % 2 else list(steps.items())[::-1]  # neither always first
                for name, step in order:
                    started = time.perf_counter()
                    for _ in range(args.steps):
                        if batch == 1:
                            step(tokens[0], positions[0])
                        else:
                            step.rows(tokens, positions)
                    times[name].append((time.perf_counter() - started) / args.steps * 1e3)
            loaded_ms, held_ms = statistics.median(times["as loaded"]), statistics.median(times["2 MiB"])
            print(f"| {batch} | {loaded_ms:.3f} | {held_ms:.3f} | {loaded_ms / held_ms:.3f} |")


if __name__ == "__main__":
    main()

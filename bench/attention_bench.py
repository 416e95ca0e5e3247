"""Decode attention side by side: the native kernel (models/ragged_attention.py) against SDPA's masked
attention over the longest row, which batched decode steps used before it.

    .venv/bin/python -m bench.attention_bench                       # bench-512's shape: 8 heads of 64
    .venv/bin/python -m bench.attention_bench --heads 32 --kv-heads 4 --batches 1,8,32

Each row holds a random number of keys between ``--min-keys`` and ``--max-keys`` (streams that started at
different times), in a cache of ``--positions`` positions a row, as the server's. The two run alternately,
``--rounds`` times, each a median of ``--repeats`` calls; the table gives medians and the ratio. GB/s counts
the keys and values each row actually holds, so SDPA's figure includes nothing it reads past them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from models import native_build, ragged_attention


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="2,4,16,32,64")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--min-keys", type=int, default=20)
    parser.add_argument("--max-keys", type=int, default=150)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = ragged_attention.load()
    if kernel is None:
        raise SystemExit(f"the kernel did not build: {native_build.load_error}")
    generator = torch.Generator().manual_seed(0)
    print(f"{args.heads} heads / {args.kv_heads} kv heads of {args.head_dim}, keys {args.min_keys}-{args.max_keys}, "
          f"{torch.get_num_threads()} threads")
    print("| batch | mean keys | SDPA masked us | native us | native GB/s | SDPA / native |")
    print("|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        shape = (batch, args.kv_heads, args.positions, args.head_dim)
        keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        query = torch.randn(batch, args.heads, 1, args.head_dim, generator=generator)
        lengths = torch.randint(args.min_keys, args.max_keys + 1, (batch,), generator=generator)
        longest = int(lengths.max())
        mask = torch.where(torch.arange(longest)[None] >= lengths[:, None], float("-inf"), 0.0)[:, None, None, :]
        gqa = args.kv_heads != args.heads

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(query, keys[:, :, :longest], values[:, :, :longest],
                                                  attn_mask=mask, enable_gqa=gqa)

        def native() -> torch.Tensor:
            return kernel(query, keys, values, lengths)

        torch.testing.assert_close(native(), sdpa(), rtol=1e-4, atol=1e-4)
        sdpa_times, native_times = [], []
        for _ in range(args.rounds):
            sdpa_times.append(median_us(sdpa, args.repeats))
            native_times.append(median_us(native, args.repeats))
        s, n = statistics.median(sdpa_times), statistics.median(native_times)
        held = int(lengths.sum()) * args.kv_heads * args.head_dim * 4 * 2
        print(f"| {batch} | {lengths.float().mean():.0f} | {s:.1f} | {n:.1f} | {held / n / 1e3:.1f} | {s / n:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()

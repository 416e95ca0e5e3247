"""The decode step replayed from CUDA graphs (RIVULET_CUDA_GRAPHS, on by default; CUDA only).

Eager on a GPU, a decode step of a small model is bound by launching its kernels rather than by running
them: TinyLlama's 22 layers are hundreds of kernels a step, each several microseconds of Python and launch
work on the host, while its 2.2 GB of weights stream from memory in about half a millisecond on an H200
(4.8 TB/s). A CUDA graph replays every kernel of a step in one launch. (Not yet measured on a GPU:
bench/gpu.sh prints both, bench/README.md section 6.) A graph fixes every shape and address, so a step is
padded to fixed sizes:

- batch buckets (``batch_buckets``): a step of B rows runs the graph of the smallest bucket >= B. The rows
  past B (padding rows) compute garbage that is dropped;
- key buckets (``key_buckets``): every row attends over the smallest bucket >= the longest row's keys,
  each row masked to its own (``Llama.decode_static``, attention grouped by key/value head).

Padding rows must not write into a real cache row: rows past B may be in use (the runner's chunk row, the
last, holds a long prompt being prefilled in chunks across steps). So the cache gets one spare position past the
served context in every row (``SPARE_POSITIONS``: one position a row, not a whole spare row, which for a
long context would cost as much as another sequence), and a padding row writes its key and value there,
at its own row. No row ever reads that position: keys are read up to the served context. A padding row's
query is at position 0 with key 0 visible, so its softmax stays finite.

Per step the host fills one pinned buffer (tokens, positions, write positions), copies it to the device
without waiting, and replays; the logits land in one static buffer, of which the runner samples the real
rows. Reading the sampled tokens back is the step's only sync. Graphs are captured on the engine thread (the
cache and weights live there): the smallest key bucket of every batch bucket at start-up, the others on
first use. All graphs share one memory pool: only one replays at a time, and its logits are copied out of
the pool into the static buffer inside the graph.

A step with a long prompt's chunk in its pass (``Llama.decode_with_chunk``) has a shape of its own each
time and runs eager, paying the launches the graphs save: next to a graphed step that cost looks like the
chunk's own to models/chunk_budget.py, which may then keep chunks small (to be measured on a GPU).

Anything that fails (a capture, an op CUDA graphs cannot hold) is logged once and every later step runs
eager: the graphs are an optimisation, never a reason not to serve. On a CPU nothing is captured; tests
build the class with ``capture=False``, which runs the same static-shape step eagerly with the same padding,
buffers and spare positions.
"""
from __future__ import annotations

import logging
import time

import torch

from models.llama import Llama

log = logging.getLogger("rivulet.engine")

# Positions each cache row holds past the served context, for the padding rows' writes.
SPARE_POSITIONS = 1
# Key buckets grow by this many keys up to KEY_BUCKET_LINEAR_UNTIL, then double: a short row pays at most
# 127 masked keys, a long one at most as many again as it has (the cost of a step's attention is
# rows x keys, small next to the weights' read until contexts are long), and the count of graphs stays
# small (each one past the first key bucket is captured on first use: a stall of that step, not yet measured).
KEY_BUCKET_STEP = 128
KEY_BUCKET_LINEAR_UNTIL = 1024
# Batch buckets past the first few grow by this many rows (as vLLM's do): padding rows cost their attention
# over the key bucket, so finer buckets past 8 would cost more graphs for little.
BATCH_BUCKET_STEP = 8


def graphs_apply(device: torch.device, enabled: bool) -> bool:
    """Whether a runner on ``device`` replays its decode steps from graphs (RIVULET_CUDA_GRAPHS=``enabled``)."""
    return enabled and device.type == "cuda"


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a graph is captured for: 1, 2, 4, 8, then every BATCH_BUCKET_STEP rows; the largest is
    ``max_batch`` itself."""
    sizes = [n for n in (1, 2, 4) if n < max_batch]
    sizes += range(BATCH_BUCKET_STEP, max_batch, BATCH_BUCKET_STEP)
    return tuple(sizes) + (max_batch,)


def key_buckets(max_seq: int) -> tuple[int, ...]:
    """The key counts a graph attends over: every KEY_BUCKET_STEP keys up to KEY_BUCKET_LINEAR_UNTIL, then
    doubling; the largest is ``max_seq`` itself."""
    sizes = list(range(KEY_BUCKET_STEP, min(max_seq, KEY_BUCKET_LINEAR_UNTIL + 1), KEY_BUCKET_STEP))
    size = KEY_BUCKET_LINEAR_UNTIL * 2
    while size < max_seq:
        sizes.append(size)
        size *= 2
    return tuple(n for n in sizes if n < max_seq) + (max_seq,)


def bucket_for(needed: int, buckets: tuple[int, ...]) -> int:
    """The smallest of ``buckets`` (ascending) that holds ``needed``."""
    for size in buckets:
        if size >= needed:
            return size
    raise ValueError(f"{needed} is past the largest bucket, {buckets[-1]}")


class GraphedDecode:
    """Plain decode steps (no prompt chunk in the pass) of rows 0..B-1, replayed from CUDA graphs.

    ``capture`` False: the static-shape step runs eagerly (tests on a CPU). The model's cache must have
    been set up with SPARE_POSITIONS past ``max_seq``; the graphs hold the addresses of its cache and
    weights, so those may change in place only (a new cache, or a replaced parameter, would leave them
    replaying over old memory: ``step`` checks the cache, nothing checks the weights)."""

    def __init__(self, model: Llama, max_batch: int, max_seq: int, capture: bool = True) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.capture = capture
        self.device = model.lm_head.weight.device
        self.cache = model.model.layers[0].self_attn.cache
        if self.cache is None or self.cache.k.shape[2] < max_seq + SPARE_POSITIONS:
            raise ValueError("the KV cache has no spare position for the padding rows: "
                             f"set it up for {max_seq + SPARE_POSITIONS} positions")
        self.batch_buckets = batch_buckets(max_batch)
        self.key_buckets = key_buckets(max_seq)
        # Tokens, positions and write positions of every row, filled on the host, then one copy.
        self.host = torch.zeros(3, max_batch, dtype=torch.long, pin_memory=capture)
        self.host_values = self.host.numpy()  # filling through numpy costs no tensor ops
        self.inputs = torch.zeros(3, max_batch, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(max_batch, model.lm_head.weight.shape[0], dtype=model.lm_head.weight.dtype,
                                  device=self.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # Recorded after each input copy: the host buffer is refilled only once the last copy has read it.
        self.copied = torch.cuda.Event() if capture else None
        self.error: str | None = None
        self.steps = 0  # steps served from the static-shape step (replayed, or run eagerly with capture off)

    def serves(self, batch: int) -> bool:
        return self.error is None and 1 <= batch <= self.max_batch

    @torch.inference_mode()  # as the engine's steps run (and the buffers may have been made in it)
    def warm_up(self) -> None:
        """Capture the smallest key bucket of every batch bucket, largest batch first (a smaller graph then
        finds the pool's memory already there). Every row is a padding row: nothing real is written."""
        if not self.capture:
            return
        started = time.perf_counter()
        try:
            self._fill([], [])
            for batch in reversed(self.batch_buckets):
                self._capture(batch, self.key_buckets[0])
        except Exception as exc:  # an op a graph cannot hold, no memory left for one: serve eager
            self._fail(exc)
            return
        log.info("RIVULET_CUDA_GRAPHS: %d decode graphs (batch %s, %d keys) captured in %.1f s; other key "
                 "counts are captured on first use", len(self.graphs), ",".join(map(str, self.batch_buckets)),
                 self.key_buckets[0], time.perf_counter() - started)

    @torch.inference_mode()
    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor | None:
        """One decode step of rows 0..B-1: ``tokens[b]`` at ``positions[b]``. -> logits [B, V], a view of
        the static buffer that the next step overwrites; None when the graphs do not serve this step (its
        failure is logged once and every later step is left to the caller, eager)."""
        batch = len(tokens)
        if not self.serves(batch):
            return None
        # A position past the served context is the caller's error, not the graphs': it raises.
        padded, keys = bucket_for(batch, self.batch_buckets), bucket_for(max(positions) + 1, self.key_buckets)
        try:
            if self.cache is not self.model.model.layers[0].self_attn.cache:
                raise RuntimeError("the model's KV cache was set up again after the graphs were captured")
            self._fill(tokens, positions)
            if not self.capture:
                self._static_step(padded, keys)
            else:
                graph = self.graphs.get((padded, keys))
                if graph is None:
                    # On first use, with this step's own inputs: the warm-up writes the same keys and values
                    # the replay then writes again, so capturing while rows are running changes nothing.
                    started = time.perf_counter()
                    graph = self._capture(padded, keys)
                    log.info("RIVULET_CUDA_GRAPHS: decode graph for batch %d, %d keys captured in %.2f s",
                             padded, keys, time.perf_counter() - started)
                graph.replay()
        except Exception as exc:
            self._fail(exc)
            return None
        self.steps += 1
        return self.logits[:batch]

    def _fill(self, tokens: list[int], positions: list[int]) -> None:
        """This step's inputs into the device buffer, padded: padding rows take token 0 at position 0 and
        write to their row's spare position."""
        if self.copied is not None:  # waits for nothing in practice: the last step read its tokens back since
            self.copied.synchronize()  # (an event never recorded has nothing to wait for)
        batch = len(tokens)
        values = self.host_values
        values[0, :batch] = tokens
        values[1, :batch] = positions
        values[2, :batch] = positions
        values[:2, batch:] = 0
        values[2, batch:] = self.max_seq  # the first spare position
        self.inputs.copy_(self.host, non_blocking=self.capture)
        if self.copied is not None:
            self.copied.record()

    def _static_step(self, batch: int, keys: int) -> None:
        """The step a graph holds: ``batch`` rows (padding included) over ``keys`` keys, logits into the
        static buffer. Nothing here may read a value back to the host, nor take a shape from one."""
        tokens, positions, write_positions = self.inputs[:, :batch]
        self.logits[:batch].copy_(self.model.decode_static(tokens, positions, write_positions, keys))

    def _capture(self, batch: int, keys: int) -> torch.cuda.CUDAGraph:
        """PyTorch's recipe: run the step once on a side stream (kernel choices, cuBLAS workspaces and the
        allocator's first blocks happen outside the graph), then capture it into the shared pool."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._static_step(batch, keys)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's calls are checked while it captures (the worker's other threads
        # never touch CUDA, and a check of theirs could only fail this capture for nothing).
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._static_step(batch, keys)
        self.graphs[(batch, keys)] = graph
        return graph

    def _fail(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        log.warning("RIVULET_CUDA_GRAPHS: the graphed decode step failed, decode steps run eager from now on: %s",
                    self.error)

"""The engine's backend for a Llama checkpoint: load it, then execute each step (a prefill or a batched decode)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import load_config, load_meta, load_model
from models.chunk_budget import ChunkBudget
from models.config import LlamaConfig
from models.cpu_weights import packing_pays, projection_bytes
from models.cuda_graphs import SPARE_POSITIONS, graphs_apply
from models.errors import CheckpointError, ModelError
from models.memory import GiB, file_backed_bytes, fitting_batch, free_bytes, kv_cache_bytes
from models.native_step import will_serve
from models.outputs import Failed, Output, Sampled
from models.quantize import int8_bytes
from models.runner import LlamaRunner, StepResult
from models.scheduler import Batch, Ticket
from models.sequence import Sequence
from models.tokenizer import Tokenizer

log = logging.getLogger("rivulet.engine")
# The largest chunk of a long prompt (RIVULET_PREFILL_CHUNK_TOKENS): each engine step runs one chunk beside
# the decode step of the running rows, so a long prompt adds a chunk's time to their inter-token latency
# instead of stalling them for the whole prompt. While rows decode, the chunk is smaller: sized from the
# measured step times (models/chunk_budget.py).
DEFAULT_PREFILL_CHUNK = 256


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer alone (the web side needs it to validate and count prompt tokens)."""
    config = load_config(directory)
    meta = load_meta(directory, config)
    return Tokenizer(directory / "tokenizer.model", bos_id=meta.bos_token_id, eos_ids=meta.eos_token_ids,
                     add_bos=meta.add_bos_token, chat_template=meta.chat_template)


def served_context(config: LlamaConfig, max_context: int | None, directory: Path) -> int:
    """The context length served: the checkpoint's, or less when RIVULET_MAX_CONTEXT asks (it sizes the
    KV cache, so it is the knob for fitting a long-context model's cache into memory)."""
    if max_context is None:
        return config.max_position_embeddings
    if max_context > config.max_position_embeddings:
        raise CheckpointError(
            f"RIVULET_MAX_CONTEXT={max_context} is longer than the context of {directory / 'config.json'} "
            f"({config.max_position_embeddings}, from max_position_embeddings or sliding_window)")
    return max_context


class LlamaBackend:
    kind = "llm"

    def __init__(self, directory: Path, device: torch.device, max_batch: int,
                 max_context: int | None = None, prefill_chunk_tokens: int | None = DEFAULT_PREFILL_CHUNK,
                 compile_decode: bool = False, prefix_caching: bool = True, packed_weights: bool = True,
                 cuda_graphs: bool = True, native_kernels: bool = True, quant: str = "none") -> None:
        self.directory = directory
        self.device = device
        self.max_batch = max_batch
        self.name = directory.name
        self.config = load_config(directory)  # cheap and early: a bad config.json fails at start-up
        self.tokenizer = load_tokenizer(directory)
        self.eos_ids = frozenset(self.tokenizer.eos_ids)
        self.context_length = served_context(self.config, max_context, directory)
        self.runner: LlamaRunner | None = None
        # Prompts longer than this are prefilled a chunk per step beside the running rows (the scheduler
        # reads it); None or 0: every prompt in one pass.
        self.prefill_chunk_tokens = prefill_chunk_tokens or None
        self.compile_decode = compile_decode  # RIVULET_COMPILE (models/compiled_decode.py)
        self.prefix_caching = prefix_caching  # RIVULET_PREFIX_CACHING (models/prefix_cache.py)
        self.packed_weights = packed_weights  # RIVULET_PACKED_WEIGHTS (models/cpu_weights.py)
        self.cuda_graphs = cuda_graphs  # RIVULET_CUDA_GRAPHS (models/cuda_graphs.py)
        self.native_kernels = native_kernels  # RIVULET_NATIVE_KERNELS (models/native_build.py)
        self.quant = quant  # RIVULET_QUANT (models/quantize.py)
        self.chunk_budget = ChunkBudget(self.prefill_chunk_tokens) if self.prefill_chunk_tokens else None

    def load(self) -> None:
        """Runs on the engine thread: the weights and the cache live there."""
        if self.device.type == "cuda":
            # The current CUDA device is per thread: make this thread's the model's (cuda:N).
            torch.cuda.set_device(self.device)
        model = load_model(self.directory, self.device)
        dtype = model.lm_head.weight.dtype
        free = free_bytes(self.device)
        # With int8 where the native step serves, the fp32 weights are released, not packed (models/native_step.py's
        # keep_only_int8); where it does not, torch's batched steps multiply the packed dequantized weights.
        int8_only = self.quant == "int8" and will_serve(model.config, self.device, dtype, self.native_kernels)
        pack = self.device.type == "cpu" and self.packed_weights and not int8_only and packing_pays(model, free)
        if pack and free is not None:  # the copy is made after the cache: leave it its room
            free -= projection_bytes(model)
        if self.quant == "int8" and free is not None:  # and the int8 rows (models/quantize.py) theirs
            free -= int8_bytes(model)
        if self.device.type == "cpu" and free is not None:  # and the weights the layout copies out of the file
            free -= file_backed_bytes(m.weight for m in model.modules() if isinstance(m, nn.Linear))
        # With CUDA graphs every cache row holds a spare position, where the graphs' padding rows write.
        spare = SPARE_POSITIONS if graphs_apply(self.device, self.cuda_graphs) else 0
        batch = fitting_batch(model.config, self.max_batch, self.context_length, dtype, self.device, free, spare)
        if batch < self.max_batch:
            log.warning("the KV cache of RIVULET_MAX_BATCH=%d sequences of %d tokens does not fit in the %.1f GiB "
                        "free on %s: %d run at once, the rest wait (a lower RIVULET_MAX_CONTEXT fits more)",
                        self.max_batch, self.context_length, free / GiB, self.device, batch)
        self.runner = LlamaRunner(model, batch, self.context_length, self.compile_decode, self.prefix_caching, pack,
                                  cuda_graphs=self.cuda_graphs, native_kernels=self.native_kernels, quant=self.quant)
        log.info("loaded %s on %s (%s); KV cache %.2f GiB for %d x %d tokens%s", self.directory, self.device, dtype,
                 kv_cache_bytes(model.config, batch, self.context_length + spare, dtype) / GiB, batch,
                 self.context_length,
                 f"; packed weights {projection_bytes(model) / GiB:.2f} GiB" if pack else "")

    def close(self) -> None:
        self.runner = None

    def free_slots(self) -> int:
        """Free KV-cache rows: fewer than RIVULET_MAX_BATCH when memory allowed no more."""
        return 0 if self.runner is None else self.runner.free_rows()

    def release(self, ticket: Ticket) -> None:
        if isinstance(ticket.work, Sequence) and self.runner is not None:
            self.runner.release(ticket.work)

    def execute(self, batch: Batch) -> list[Output]:
        """Prefill the requests just admitted, or run one decode step shared by every running sequence and
        the next chunk of a long prompt.

        Running out of memory fails this batch's requests only (a smaller batch may fit); anything else
        a forward pass raises is the engine's failure and propagates."""
        if self.runner is None:
            raise RuntimeError("LlamaBackend.execute before load()")
        if batch.prefill:
            seqs = [self._sequence(ticket) for ticket in batch.prefill]
            return self._step(batch.prefill, lambda: self.runner.prefill(seqs))
        if not (batch.decode or batch.chunk is not None):
            return []
        chunk_of, chunk_tokens = None, 0
        if batch.chunk is not None:
            chunk_of = batch.chunk.work or self._sequence(batch.chunk)
            chunk_tokens = self._chunk_tokens(chunk_of, decoding_rows=len(batch.decode))
        tickets = batch.decode + ((batch.chunk,) if batch.chunk is not None else ())
        started = time.perf_counter()
        # Ends on reading the sampled tokens back, so on a GPU too the time is the step's, chunk included.
        outputs = self._step(tickets, lambda: self.runner.decode(chunk_of, chunk_tokens))
        if self.chunk_budget is not None and batch.decode:
            self.chunk_budget.record_step(time.perf_counter() - started, chunk_tokens, len(batch.decode))
        return outputs

    def _chunk_tokens(self, seq: Sequence, decoding_rows: int) -> int:
        """The size of a long prompt's next chunk: what the running rows can wait for, at most what is left."""
        if self.chunk_budget is None or self.runner is None:
            raise RuntimeError("a prompt chunk with chunked prefill off")  # the scheduler never makes one
        done = self.runner.chunked if self.runner.chunking is seq else 0
        return min(self.chunk_budget.next_chunk(decoding_rows), len(seq.request.prompt_ids) - done)

    def _sequence(self, ticket: Ticket) -> Sequence:
        ticket.work = Sequence(ticket.request, self.tokenizer, self.eos_ids, self.context_length)
        ticket.prompt_tokens = len(ticket.request.prompt_ids)
        return ticket.work

    def _step(self, tickets: tuple[Ticket, ...], step: Callable[[], list[StepResult]]) -> list[Output]:
        try:
            results = step()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("out of memory in a step of %d requests: they fail, the engine goes on", len(tickets))
            return [Failed(t, ModelError(f"out of memory for this batch: {exc}")) for t in tickets]
        by_sequence = {id(t.work): t for t in tickets}
        return [Failed(by_sequence[id(r.seq)], r.error) if r.error is not None
                else Sampled(by_sequence[id(r.seq)], r.token, r.logprob) for r in results]


def is_out_of_memory(exc: BaseException) -> bool:
    """The device (CUDA) or the host allocator (CPU: a plain RuntimeError) could not allocate."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))

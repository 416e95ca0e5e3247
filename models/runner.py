"""The batched model runner: one cache row per running sequence, batched prefill, one shared decode step.

Rows are kept compact: running sequences always occupy rows 0..B-1, so the decode step attends over a
view of the cache. When a sequence leaves, the last row's cache moves into its place (one copy per
finished request, not per step).

The runner counts each row's cached positions itself rather than deriving them from the sequence's
tokens: a row's newest sampled token is never cached yet, and a failed step may have cached a
position without appending a token, so only the runner knows how much of a row is real.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from models import native_build, native_step
from models.api import TokenLogprob
from models.attention_plan import AttentionPlan, plan_decode_attention
from models.compiled_decode import CompiledDecode
from models.exported_decode import ExportedDecode
from models.cuda_graphs import SPARE_POSITIONS, GraphedDecode, graphs_apply
from models.prefix_cache import best_source
from models.row_prompts import RowPrompts
from models.cpus import LoadAwareThreads, usable_cpus
from models.errors import ModelError, RivuletError
from models.huge_pages import hold_in_huge_pages
from models.llama import Llama
from models.memory import return_freed_memory
from models.prompt_checks import prompt_error
from models.quantize import QUANT_MODES, quantize_model
from models.sampling import make_generator, sample, token_logprobs
from models.sequence import Sequence

log = logging.getLogger("rivulet.engine")


# Padded prompt tokens per prefill pass: big enough that a burst of short prompts shares one pass,
# small enough that its activations stay modest on a CPU.
PREFILL_TOKEN_BUDGET = 4096


@dataclass(frozen=True, slots=True)
class StepResult:
    """One row's outcome of a prefill or decode step: its next token, or why this request failed."""

    seq: Sequence
    token: int | None
    error: RivuletError | None = None
    logprob: TokenLogprob | None = None  # only when the request asked for logprobs


def histories(seqs: list[Sequence]) -> list[tuple[list[int], list[int]] | None] | None:
    """What the penalties look at, for the rows that have any (None when no row does)."""
    if not any(s.params.penalised for s in seqs):
        return None
    return [(s.request.prompt_ids, s.output_ids) if s.params.penalised else None for s in seqs]


def step_results(seqs: list[Sequence], logits: torch.Tensor, sampled: list[int | ModelError]) -> list[StepResult]:
    logprobs = token_logprobs(logits, [s.params for s in seqs], sampled)
    return [StepResult(seq, None, out) if isinstance(out, ModelError) else StepResult(seq, out, logprob=lp)
            for seq, out, lp in zip(seqs, sampled, logprobs)]


class LlamaRunner:
    def __init__(self, model: Llama, max_batch: int, max_seq: int | None = None, compile_decode: bool = False,
                 prefix_caching: bool = True, packed_weights: bool = True, cuda_graphs: bool = True,
                 uncaptured_graphs: bool = False, native_kernels: bool = True, quant: str = "none") -> None:
        self.model = model
        self.device = model.lm_head.weight.device
        self.max_batch = max_batch
        # Positions per row: the model's context, or less (RIVULET_MAX_CONTEXT) to keep the cache small.
        self.max_seq = min(max_seq or model.config.max_position_embeddings, model.config.max_position_embeddings)
        # RIVULET_CUDA_GRAPHS: on CUDA, plain decode steps replayed from graphs (models/cuda_graphs.py), whose
        # padding rows write to a spare position past each cache row's last. ``uncaptured_graphs`` (tests): the
        # same static-shape step run eagerly, on any device.
        graphed = uncaptured_graphs or graphs_apply(self.device, cuda_graphs)
        model.setup_cache(max_batch, self.max_seq + (SPARE_POSITIONS if graphed else 0))
        model.fuse_projections()
        # RIVULET_QUANT=int8: before the CPU layouts and packed copies, which then hold the quantized values.
        if quant not in QUANT_MODES:
            raise ValueError(f"unknown quantization {quant!r}: expected one of {', '.join(QUANT_MODES)}")
        quantized_bytes = quantize_model(model) if quant == "int8" else 0
        # RIVULET_NATIVE_KERNELS: on a CPU in fp32, C kernels built at start-up (models/native_build.py) run
        # every plain decode step (models/native_step.py) and the attention of steps that carry a prompt's
        # chunk (models/ragged_attention.py).
        native = (native_kernels and self.device.type == "cpu" and model.lm_head.weight.dtype == torch.float32
                  and native_build.load() is not None)
        # With int8 where the native step serves, every product reads the int8 rows and the fp32 weights go:
        # no packed copy of them either.
        native_steps = native_step.will_serve(model.config, self.device, model.lm_head.weight.dtype, native_kernels)
        int8_only = quant == "int8" and native_steps
        if self.device.type == "cpu":  # weights laid out for the CPU's matmul kernels (models/cpu_weights.py):
            # compiled steps (``row_dots``) and the native step read the loaded layout, eager ones the
            # transposed
            model.lay_out_for_cpu(pack=packed_weights and not int8_only,
                                  transposed=not compile_decode and not native_steps)
        if native:  # set before any step is compiled, which then calls the kernel
            model.use_native_attention()
        released = native_step.keep_only_int8(model, native_build.load()) if int8_only else 0
        # On a CPU the weights every step streams in 2 MiB pages (models/huge_pages.py), before the native
        # step binds their addresses.
        held = hold_in_huge_pages(model) if self.device.type == "cpu" else 0
        if held:
            log.info("weights: %.1f MiB held in 2 MiB pages (transparent huge pages)", held / 2**20)
        if held or quant == "int8":
            return_freed_memory()
        self.native_step: native_step.NativeStep | None = native_step.bind(model) if native else None
        if quant == "int8":
            if int8_only:
                log.info("RIVULET_QUANT=int8: %.1f MiB of int8 weights serve every product (decode steps and "
                         "prompts); %.1f MiB of fp32 weights released", quantized_bytes / 2**20, released / 2**20)
            else:  # a GPU, bf16 weights, or no native kernels: torch multiplies the fp32 copy
                log.warning("RIVULET_QUANT=int8: the native CPU step does not serve here (it needs fp32 on a CPU "
                            "with RIVULET_NATIVE_KERNELS): outputs are the int8 model's, steps run at fp32 speed")
        # Torch threads per step from the load, on CPU only. The engine has already set its thread count
        # (CPUs - 1 by default) on this thread: that is the count for a busy step.
        self.thread_policy: LoadAwareThreads | None = None
        if self.device.type == "cpu":
            self.thread_policy = LoadAwareThreads(idle=max(usable_cpus(), torch.get_num_threads()),
                                                  busy=torch.get_num_threads())
        # RIVULET_COMPILE: plain decode steps through torch.compile, compiled here, before the first request
        # (on a CPU for the thread count of a step with few streams: models/compiled_decode.py).
        # Not where the native step serves: it takes every plain step first, so the compiled one would
        # serve none, after seconds to a minute of compiling.
        self.compiled: CompiledDecode | None = None
        if compile_decode and self.native_step is not None:
            log.info("RIVULET_COMPILE: not compiled, the native CPU step (RIVULET_NATIVE_KERNELS) serves every "
                     "decode step")
        elif compile_decode:
            self.compiled = CompiledDecode(model, self.thread_policy.idle if self.thread_policy else None)
            self.compiled.warm_up(max_batch)
        # And on a CPU the batch-1 step also ahead of time, without Dynamo or Python between its kernels
        # (models/exported_decode.py); torch.compile's serves what it does not. Not tried where torch.compile
        # failed: the same C++ compiler would be missing (as in the Docker image), after seconds of export.
        # Where the native step serves, the library would serve nothing: not built.
        self.exported: ExportedDecode | None = None
        if (self.compiled is not None and self.thread_policy is not None and self.compiled.error is None
                and self.native_step is None):
            self.exported = ExportedDecode(model, self.thread_policy.idle)
            self.exported.build()
        # Captured here, on the engine thread, with the cache and weights in place (they must stay there).
        self.graphed: GraphedDecode | None = None
        if graphed:
            self.graphed = GraphedDecode(model, max_batch, self.max_seq, capture=not uncaptured_graphs)
            self.graphed.warm_up()
        # A prompt that begins like a running row's starts from a copy of its cached prefix
        # (models/prefix_cache.py). Counted for the log and the tests: prompt tokens not computed.
        self.prefix_caching = prefix_caching
        self.prefix_tokens_reused = 0
        # The prompt each row holds (running rows, and freed ones until overwritten) with its last logits:
        # the same prompt again is copied, not computed (models/row_prompts.py). Part of prefix caching.
        self.row_prompts = RowPrompts()
        self.rows: list[Sequence] = []
        self.cached: list[int] = []  # positions written to each row's cache, parallel to rows
        # A long prompt is prefilled in chunks (prefill_chunk) in the last cache row, which running rows
        # never reach while it is in use (free_rows leaves it out); complete, it joins them.
        self.chunk_row = max_batch - 1
        self.chunking: Sequence | None = None
        self.chunked = 0  # prompt tokens of ``chunking`` cached so far

    def free_rows(self) -> int:
        """Rows a new sequence may take now (the chunk row counts as taken while a prompt is in it)."""
        return self.max_batch - len(self.rows) - (self.chunking is not None)

    def prefill_chunk(self, seq: Sequence, budget: int) -> StepResult | None:
        """Cache the next ``budget`` tokens of ``seq``'s prompt, alone (no row is decoding). -> once the
        prompt is complete, its first sampled token (it then holds a row and decodes with the others);
        None before that."""
        error = self._start_chunking(seq)
        if error is not None:
            return error
        chunk = self._next_chunk(seq, budget)
        logits = self.model.prefill_chunk(self._ids(chunk), self.chunk_row, self.chunked)  # [V]
        return self._chunk_done(seq, len(chunk), logits)

    def _start_chunking(self, seq: Sequence) -> StepResult | None:
        """Take the chunk row for ``seq`` if it is new there. -> its failure, if its prompt cannot fit."""
        if self.chunking is seq:
            return None
        if self.chunking is not None or len(self.rows) >= self.max_batch:
            raise RuntimeError("no free cache row for a chunked prefill")  # the scheduler admits one
        error = prompt_error(seq.request.prompt_ids, self.max_seq)
        if error is not None:
            return StepResult(seq, None, error)
        seq.generator = make_generator(seq.params, self.device)
        self.row_prompts.forget(self.chunk_row)  # its chunks overwrite it from position 0
        self.chunking, self.chunked = seq, self._copy_shared_prefix(seq, self.chunk_row, len(self.rows))
        return None

    def _copy_shared_prefix(self, seq: Sequence, row: int, running: int) -> int:
        """Copy into ``row`` the longest prefix of ``seq``'s prompt that one of the first ``running`` rows
        has cached (prefix caching). -> how many positions were copied (0: none long enough)."""
        if not self.prefix_caching:
            return 0
        candidates = [(r, self.rows[r].request.prompt_ids, self.cached[r]) for r in range(running)]
        source = best_source(seq.request.prompt_ids, candidates)
        if source is None:
            return 0
        source_row, shared = source
        self._move_row(source_row, row, shared)
        self.prefix_tokens_reused += shared
        return shared

    def _move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` cached positions into row ``dst``."""
        self.row_prompts.forget(dst)  # first: a copy that fails halfway leaves no record behind
        self.model.move_cache_row(src, dst, length)
        self.row_prompts.moved(src, dst, length)

    def _reuse_prompt(self, seq: Sequence) -> StepResult | None:
        """If a row holds exactly ``seq``'s prompt, give ``seq``'s row a copy of it (nothing to copy when
        it is that row) -> its first token, sampled from the held logits; None when no row does."""
        prompt = seq.request.prompt_ids
        found = self.row_prompts.find(prompt, prefer=seq.row)
        if found is None:
            return None
        source, logits = found
        if source != seq.row:
            self._move_row(source, seq.row, len(prompt))
        self.cached[seq.row] = len(prompt)
        self.prefix_tokens_reused += len(prompt)
        return self._first_token(seq, logits)

    @staticmethod
    def _first_token(seq: Sequence, logits: torch.Tensor) -> StepResult:
        """``seq``'s first token, sampled from its prompt's last logits [V] with its own parameters."""
        logits = logits.unsqueeze(0)  # [1, V]
        return step_results([seq], logits, sample(logits, [seq.params], [seq.generator], histories([seq])))[0]

    def _next_chunk(self, seq: Sequence, budget: int) -> list[int]:
        return seq.request.prompt_ids[self.chunked:self.chunked + budget]

    def _chunk_done(self, seq: Sequence, size: int, logits: torch.Tensor) -> StepResult | None:
        """Count a chunk of ``size`` tokens as cached; if it completed the prompt, move the prompt into the
        next running row and -> its first sampled token from ``logits`` [V]."""
        self.chunked += size
        prompt = seq.request.prompt_ids
        if self.chunked < len(prompt):
            return None
        row = len(self.rows)
        if row != self.chunk_row:
            self._move_row(self.chunk_row, row, len(prompt))
        self.row_prompts.hold(row, prompt, logits)
        seq.row = row
        self.rows.append(seq)
        self.cached.append(len(prompt))
        self.chunking = None
        return self._first_token(seq, logits)

    def prefill(self, seqs: list[Sequence]) -> list[StepResult]:
        """Give each of ``seqs`` a free row, run their prompts, -> each one's first sampled token.

        Prompts go through the model together, right-padded, in groups of at most
        ``PREFILL_TOKEN_BUDGET`` padded tokens (a burst of arrivals costs a few batched passes, not
        one pass each). A request's own problem (an empty or too long prompt, NaN logits) is its
        ``StepResult.error``. Every sequence holds its row until the caller releases it.
        """
        if len(self.rows) + len(seqs) > self.max_batch:
            raise RuntimeError("no free cache row")  # the scheduler never admits past max_batch
        # Threads from the streams already running: the hub serves those while the prompts compute (a
        # burst of new requests into an idle server gets every core, which halves its time to first token).
        if self.thread_policy is not None:
            self._set_threads(self.thread_policy.prefill_threads(len(self.rows)))
        results: dict[int, StepResult] = {}
        valid: list[Sequence] = []
        running = len(self.rows)  # rows with their prompts cached: sources for prefix caching
        for seq in seqs:
            seq.row = len(self.rows)
            self.rows.append(seq)
            self.cached.append(0)
            error = prompt_error(seq.request.prompt_ids, self.max_seq)
            if error is not None:
                results[id(seq)] = StepResult(seq, None, error)
            else:
                seq.generator = make_generator(seq.params, self.device)
                valid.append(seq)
        whole: list[Sequence] = []
        computing: set[tuple[int, ...]] = set()
        repeats: list[Sequence] = []  # the same prompt as one computed in this burst: copied after it
        for seq in valid:
            reused = self._reuse_prompt(seq) if self.prefix_caching else None
            if reused is not None:  # a row holds this very prompt
                results[id(seq)] = reused
                continue
            prompt = tuple(seq.request.prompt_ids)
            if self.prefix_caching and prompt in computing:
                repeats.append(seq)
                continue
            shared = self._copy_shared_prefix(seq, seq.row, running)
            if shared:  # a prompt that begins like a running row's computes only the rest
                results[id(seq)] = self._prefill_rest(seq, shared)
            else:
                whole.append(seq)
                computing.add(prompt)
        for group in self._prefill_groups(whole):
            for result in self._prefill_group(group):
                results[id(result.seq)] = result
        for seq in repeats:
            reused = self._reuse_prompt(seq)
            assert reused is not None, "a prompt computed in this burst is held by its row"
            results[id(seq)] = reused
        return [results[id(seq)] for seq in seqs]

    def _prefill_rest(self, seq: Sequence, start: int) -> StepResult:
        """Prefill ``seq``'s prompt from ``start`` on, its row holding the positions before. -> its first token."""
        prompt = seq.request.prompt_ids
        logits = self.model.prefill_chunk(self._ids(prompt[start:]), seq.row, start)  # [V]
        self.row_prompts.hold(seq.row, prompt, logits)
        self.cached[seq.row] = len(prompt)
        return self._first_token(seq, logits)

    @staticmethod
    def _prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
        groups: list[list[Sequence]] = []
        longest = 0
        for seq in seqs:
            length = len(seq.request.prompt_ids)
            if groups and max(longest, length) * (len(groups[-1]) + 1) <= PREFILL_TOKEN_BUDGET:
                groups[-1].append(seq)
                longest = max(longest, length)
            else:
                groups.append([seq])
                longest = length
        return groups

    def _prefill_group(self, group: list[Sequence]) -> list[StepResult]:
        lengths_list = [len(s.request.prompt_ids) for s in group]
        width = max(lengths_list)
        padded = [s.request.prompt_ids + [0] * (width - len(s.request.prompt_ids)) for s in group]
        tokens = self._ids(padded)  # [N, T]
        rows = self._ids([s.row for s in group])
        lengths = self._ids(lengths_list)
        for seq in group:
            self.row_prompts.forget(seq.row)
        logits = self.model.prefill(tokens, rows, lengths)  # [N, V]
        for i, (seq, length) in enumerate(zip(group, lengths_list)):
            self.cached[seq.row] = length
            self.row_prompts.hold(seq.row, seq.request.prompt_ids, logits[i])
        sampled = sample(logits, [s.params for s in group], [s.generator for s in group], histories(group))
        return step_results(group, logits, sampled)

    def decode(self, chunk_of: Sequence | None = None, chunk_budget: int = 0) -> list[StepResult]:
        """One step for every running sequence, in row order; with ``chunk_of``, the next ``chunk_budget``
        tokens of that long prompt go through the same pass (one read of the weights for both), and its
        result follows the rows' when the prompt completes (or cannot fit)."""
        if not self.rows:
            if chunk_of is None:
                return []
            result = self.prefill_chunk(chunk_of, chunk_budget)
            return [result] if result is not None else []
        chunk_result = self._start_chunking(chunk_of) if chunk_of is not None else None
        if chunk_result is not None:  # its prompt cannot fit: it fails, the rows decode alone
            chunk_of = None
        started = time.perf_counter()
        threads = None
        if self.thread_policy is not None:
            threads = self.thread_policy.threads_for(len(self.rows))
            self._set_threads(threads)
        # A row's newest token sits at the position after its cached ones.
        positions_list = list(self.cached)
        chunk = self._next_chunk(chunk_of, chunk_budget) if chunk_of is not None else []
        logits, chunk_logits = self._forward(positions_list, chunk)
        self.cached = [n + 1 for n in positions_list]
        rows = list(self.rows)
        sampled = sample(logits, [s.params for s in rows], [s.generator for s in rows], histories(rows))
        if threads is not None and chunk_of is None:  # the tokens are on the host: the step is over
            self.thread_policy.record(len(rows), threads, time.perf_counter() - started)
        results = step_results(rows, logits, sampled)
        if chunk_of is not None:
            chunk_result = self._chunk_done(chunk_of, len(chunk), chunk_logits)
        return results + ([chunk_result] if chunk_result is not None else [])

    def _forward(self, positions_list: list[int], chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decode pass for every row at ``positions_list``, with ``chunk`` (tokens of the long prompt
        being prefilled, or none) in the same pass. -> (logits [B, V], the chunk's last logits [V] or None)"""
        if not chunk and self.graphed is not None:
            # Every row masked over a key bucket: the graphs plan no lone rows (models/cuda_graphs.py).
            logits = self.graphed.step([s.last_token for s in self.rows], positions_list)
            if logits is not None:  # None: the graphs failed once (logged), this step and later ones run eager
                return logits, None
        if not chunk and self.native_step is not None and self.native_step.serves_rows(positions_list):
            if len(self.rows) == 1:  # a matrix-vector pass, streaming the weights once
                return self.native_step(self.rows[0].last_token, positions_list[0]), None
            return self.native_step.rows([s.last_token for s in self.rows], positions_list), None
        tokens = self._ids([s.last_token for s in self.rows])
        positions = self._ids(positions_list)
        lengths = [n + 1 for n in positions_list]
        # The native kernel attends over each row's own keys: nothing to plan.
        plan = AttentionPlan(max(lengths)) if self.model.native_attention else plan_decode_attention(lengths)
        alone_rows = {row for row, _ in plan.alone}
        # The shared attention needs a mask unless every row in it sees all its keys.
        ragged = any(n + 1 < plan.shared_keys for row, n in enumerate(positions_list) if row not in alone_rows)
        if chunk:
            return self.model.decode_with_chunk(tokens, positions, plan.shared_keys, ragged, self._ids(chunk),
                                                self.chunk_row, self.chunked, plan.alone)
        threads = torch.get_num_threads()
        if len(self.rows) == 1 and self.exported is not None and self.exported.serves(threads, plan.shared_keys):
            return self.exported(tokens, positions, plan.shared_keys), None
        if not plan.alone and self.compiled is not None and self.compiled.serves(threads):
            return self.compiled(tokens, positions, plan.shared_keys, ragged), None
        return self.model.decode(tokens, positions, plan.shared_keys, ragged, plan.alone), None

    def _ids(self, values: list) -> torch.Tensor:
        """A long tensor on the model's device. On CUDA it goes through pinned memory without a wait: the
        step's only sync stays the read-back of the sampled tokens."""
        host = torch.tensor(values, dtype=torch.long, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    @staticmethod
    def _set_threads(threads: int) -> None:
        if threads != torch.get_num_threads():  # process-wide, and only cheap when it changes nothing
            torch.set_num_threads(threads)

    def release(self, seq: Sequence) -> None:
        """Free ``seq``'s row; the last row moves into the hole to keep rows compact."""
        if self.chunking is seq:  # ended mid-prompt: its partial prompt is simply forgotten
            self.chunking = None
        row = seq.row
        if row < 0 or row >= len(self.rows) or self.rows[row] is not seq:
            return
        last_row = len(self.rows) - 1
        if row != last_row:
            last = self.rows[last_row]
            self._move_row(last_row, row, self.cached[last_row])
            self.rows[row], self.cached[row] = last, self.cached[last_row]
            last.row = row
        self.rows.pop()
        self.cached.pop()
        seq.row = -1

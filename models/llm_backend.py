"""The engine's work for a Llama checkpoint: load it, then admit → prefill → batched decode step."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.api import TextDelta
from models.checkpoint import load_config, load_meta, load_model
from models.config import LlamaConfig
from models.errors import CheckpointError, ModelError, RivuletError
from models.memory import GiB, fitting_batch, free_bytes, kv_cache_bytes
from models.runner import LlamaRunner, StepResult
from models.scheduler import Scheduler, Ticket
from models.sequence import Sequence
from models.tokenizer import Tokenizer

log = logging.getLogger("rivulet.engine")

# What one request's own work may raise without harming the others: its prompt, its sampling, its
# detokenization. Anything else from a step (the batched forward pass) is engine-wide.
REQUEST_ERRORS = (RivuletError, RuntimeError, ValueError, IndexError, KeyError, UnicodeError)


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer alone (the web side needs it to validate and count prompt tokens)."""
    config = load_config(directory)
    meta = load_meta(directory, config)
    return Tokenizer(directory / "tokenizer.model", bos_id=meta.bos_token_id, eos_ids=meta.eos_token_ids,
                     add_bos=meta.add_bos_token, chat_template=meta.chat_template)


def as_model_error(exc: Exception, what: str) -> RivuletError:
    """A request's own failure as the error its client sees (typed errors pass through)."""
    return exc if isinstance(exc, RivuletError) else ModelError(f"{what} failed: {exc}")


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
                 max_context: int | None = None) -> None:
        self.directory = directory
        self.device = device
        self.max_batch = max_batch
        self.name = directory.name
        self.config = load_config(directory)  # cheap and early: a bad config.json fails at start-up
        self.tokenizer = load_tokenizer(directory)
        self.eos_ids = frozenset(self.tokenizer.eos_ids)
        self.context_length = served_context(self.config, max_context, directory)
        self.runner: LlamaRunner | None = None

    def load(self) -> None:
        """Runs on the engine thread: the weights and the cache live there."""
        if self.device.type == "cuda":
            # The current CUDA device is per thread: make this thread's the model's (cuda:N).
            torch.cuda.set_device(self.device)
        model = load_model(self.directory, self.device)
        dtype = model.lm_head.weight.dtype
        free = free_bytes(self.device)
        batch = fitting_batch(model.config, self.max_batch, self.context_length, dtype, self.device, free)
        if batch < self.max_batch:
            log.warning("the KV cache of RIVULET_MAX_BATCH=%d sequences of %d tokens does not fit in the %.1f GiB "
                        "free on %s: %d run at once, the rest wait (a lower RIVULET_MAX_CONTEXT fits more)",
                        self.max_batch, self.context_length, free / GiB, self.device, batch)
        self.runner = LlamaRunner(model, batch, self.context_length)
        log.info("loaded %s on %s (%s); KV cache %.2f GiB for %d x %d tokens", self.directory, self.device, dtype,
                 kv_cache_bytes(model.config, batch, self.context_length, dtype) / GiB, batch, self.context_length)

    def close(self) -> None:
        self.runner = None

    def release(self, ticket: Ticket) -> None:
        if isinstance(ticket.work, Sequence) and self.runner is not None:
            self.runner.release(ticket.work)

    def step(self, scheduler: Scheduler) -> None:
        """Prefill what was admitted, then one decode step shared by every running sequence."""
        if self.runner is None:
            raise RuntimeError("LlamaBackend.step before load()")
        # At most the cache's free rows: fewer than RIVULET_MAX_BATCH when memory allowed no more.
        admitted = scheduler.admit(limit=self.runner.max_batch - len(self.runner.rows))
        if admitted:
            self._prefill(scheduler, admitted)
        if self.runner.rows:
            self._hand_out(scheduler, self.runner.decode(), "decoding")

    def _prefill(self, scheduler: Scheduler, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            ticket.work = Sequence(ticket.request, self.tokenizer, self.eos_ids, self.context_length)
            ticket.prompt_tokens = len(ticket.request.prompt_ids)
        try:
            results = self.runner.prefill([t.work for t in tickets])
        except REQUEST_ERRORS as exc:  # the prompts' pass failed (say, out of memory): fail them, not all
            log.warning("prefill failed for %d requests: %s", len(tickets), exc)
            for ticket in tickets:
                scheduler.finish(ticket, "error", as_model_error(exc, "prefill"))
            return
        self._hand_out(scheduler, results, "prefill")

    def _hand_out(self, scheduler: Scheduler, results: list[StepResult], what: str) -> None:
        """Send each row's new text, then finish the requests that ended (or failed) at this step."""
        tickets = {id(t.work): t for t in scheduler.running}
        finished: list[tuple[Ticket, str, RivuletError | None]] = []
        for result in results:
            ticket = tickets[id(result.seq)]
            if result.error is not None:
                finished.append((ticket, "error", result.error))
                continue
            if result.logprob is not None:
                ticket.work.pending_logprobs.append(result.logprob)
            try:
                reason = self._append(ticket, result.token)
            except REQUEST_ERRORS as exc:  # this request's detokenization or sink, not the engine's
                log.warning("request %s failed in %s: %s", ticket.request_id, what, exc)
                finished.append((ticket, "error", as_model_error(exc, what)))
                continue
            if reason:
                finished.append((ticket, reason, None))
        for ticket, reason, error in finished:
            scheduler.finish(ticket, reason, error)

    def _append(self, ticket: Ticket, token: int) -> str | None:
        seq: Sequence = ticket.work
        text, reason = seq.append(token)
        ticket.completion_tokens = len(seq.output_ids)
        # Logprobs of held-back tokens wait for the next text, or go out with the last delta.
        logprobs = ()
        if seq.pending_logprobs and (text or reason):
            logprobs, seq.pending_logprobs = tuple(seq.pending_logprobs), []
        if text or logprobs:
            ticket.sink.put(TextDelta(text, ticket.completion_tokens, logprobs))
        return reason

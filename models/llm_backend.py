"""The engine's work for a Llama checkpoint: load it, then admit → prefill → batched decode step."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.api import TextDelta
from models.checkpoint import load_config, load_meta, load_model
from models.errors import ModelError
from models.runner import LlamaRunner
from models.scheduler import Scheduler, Ticket
from models.sequence import Sequence
from models.tokenizer import Tokenizer

log = logging.getLogger("rivulet.engine")


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer alone (the web side needs it to validate and count prompt tokens)."""
    config = load_config(directory)
    meta = load_meta(directory, config)
    return Tokenizer(directory / "tokenizer.model", bos_id=meta.bos_token_id, eos_ids=meta.eos_token_ids,
                     add_bos=meta.add_bos_token, chat_template=meta.chat_template)


class LlamaBackend:
    kind = "llm"

    def __init__(self, directory: Path, device: torch.device, max_batch: int) -> None:
        self.directory = directory
        self.device = device
        self.max_batch = max_batch
        self.name = directory.name
        self.config = load_config(directory)  # cheap and early: a bad config.json fails at start-up
        self.tokenizer = load_tokenizer(directory)
        self.context_length = self.config.max_position_embeddings
        self.runner: LlamaRunner | None = None

    def load(self) -> None:
        """Runs on the engine thread: the weights and the cache live there."""
        model = load_model(self.directory, self.device)
        self.runner = LlamaRunner(model, self.max_batch)
        log.info("loaded %s on %s (%s)", self.directory, self.device, model.lm_head.weight.dtype)

    def close(self) -> None:
        self.runner = None

    def release(self, ticket: Ticket) -> None:
        if isinstance(ticket.work, Sequence) and self.runner is not None:
            self.runner.release(ticket.work)

    def step(self, scheduler: Scheduler) -> None:
        """Prefill what was admitted, then one decode step shared by every running sequence."""
        assert self.runner is not None
        for ticket in scheduler.admit():
            seq = Sequence(ticket.request, self.tokenizer, frozenset(self.tokenizer.eos_ids), self.context_length)
            ticket.work = seq
            ticket.prompt_tokens = len(seq.request.prompt_ids)
            try:
                token = self.runner.prefill(seq)
            except (RuntimeError, ValueError, IndexError) as exc:  # this request's fault, not the engine's
                log.exception("prefill failed for %s", ticket.request_id)
                scheduler.finish(ticket, "error", ModelError(f"prefill failed: {exc}"))
                continue
            reason = self._append(ticket, token)
            if reason:
                scheduler.finish(ticket, reason)
        self._decode(scheduler)

    def _decode(self, scheduler: Scheduler) -> None:
        steps = self.runner.decode()
        by_seq = {id(t.work): t for t in scheduler.running}
        finished: list[tuple[Ticket, str]] = []
        # Append every token first, then release: moving a cache row needs each row's length settled.
        for seq, token in steps:
            ticket = by_seq[id(seq)]
            reason = self._append(ticket, token)
            if reason:
                finished.append((ticket, reason))
        for ticket, reason in finished:
            scheduler.finish(ticket, reason)

    def _append(self, ticket: Ticket, token: int) -> str | None:
        seq: Sequence = ticket.work
        text, reason = seq.append(token)
        ticket.completion_tokens = len(seq.output_ids)
        if text:
            ticket.sink.put(TextDelta(text, ticket.completion_tokens))
        return reason

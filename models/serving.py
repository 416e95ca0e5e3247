"""The web side's one way into ``models/``: what a served model is, and the factory that opens one.

``open_model(spec)`` reads what is cheap (a checkpoint's config and tokenizer, a package's schema) so a
bad RIVULET_MODEL fails at start-up, and returns a ``ServedModel``: everything a route may ask of the
model (its name and kind, how to turn a request into prompt tokens or package inputs, its context) and
its ``engine``, the client of the engine thread (submit, abort, state). The weights load later, on that
thread (``engine.run``). The web side imports this module, ``models.api`` (the request and event types
that cross over) and ``models.errors``, and nothing else of ``models/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.engine import Engine
from models.engine_loop import DEAD, Backend
from models.errors import InvalidRequest
from models.llm_backend import LlamaBackend
from models.package import PackageBackend, is_package_dir
# What the web side needs to describe a package's inputs (its OpenAPI document): the schema type and bounds.
from models.package_schema import INT64_MAX, INT64_MIN, KSERVE_ENVELOPE_KEYS, WIRE_DATATYPES, InputSchema
from models.prompt_checks import prompt_error

LLM, PACKAGE = "llm", "package"
__all__ = ["Backend", "DEAD", "INT64_MAX", "INT64_MIN", "InputSchema", "KSERVE_ENVELOPE_KEYS", "LLM", "PACKAGE",
           "ModelSpec", "ServedModel", "WIRE_DATATYPES", "open_model", "prompt_error", "resolve_device"]


@dataclass(frozen=True)
class ModelSpec:
    """What to serve and how (the RIVULET_* settings that reach ``models/``)."""

    directory: Path
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    max_batch: int = 32
    max_waiting: int = 256
    max_context: int | None = None
    prefill_chunk_tokens: int = 256  # 0: every prompt in one pass
    compile_decode: bool = False  # the decode step through torch.compile
    prefix_caching: bool = True  # a prompt that begins like a running one's copies that row's prefix
    packed_weights: bool = True  # on a CPU, a prepacked copy of the weights for batched steps
    cuda_graphs: bool = True  # on CUDA, plain decode steps replayed from CUDA graphs
    native_kernels: bool = True  # on a CPU, decode steps through models/native_kernels.c where it builds
    quant: str = "none"  # none, or int8: weight-only int8 (models/quantize.py)


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def open_model(spec: ModelSpec, *, backend: Backend | None = None) -> ServedModel:
    """A model package when ``spec.directory`` is one, else a Llama checkpoint. Raises CheckpointError.
    ``backend``: serve this ready-made backend instead (tests, embedding)."""
    if backend is None:
        device = resolve_device(spec.device)
        if is_package_dir(spec.directory):
            backend = PackageBackend(spec.directory, device)
        else:
            backend = LlamaBackend(spec.directory, device, spec.max_batch, spec.max_context,
                                   spec.prefill_chunk_tokens, spec.compile_decode, spec.prefix_caching,
                                   spec.packed_weights, spec.cuda_graphs, spec.native_kernels, spec.quant)
    engine = Engine(backend, max_batch=spec.max_batch, max_waiting=spec.max_waiting)
    return ServedModel(backend, engine)


class ServedModel:
    """One served model, as the web side sees it. Cheap to ask: nothing here waits for the engine."""

    def __init__(self, backend: Backend, engine: Engine) -> None:
        self._backend = backend
        self.engine = engine
        self.name: str = backend.name
        self.kind: str = backend.kind
        self.device = str(getattr(backend, "device", "?"))
        self._tokenizer = getattr(backend, "tokenizer", None)
        self.context_length: int | None = getattr(backend, "context_length", None)
        # No prompt longer than this many characters can fit the context (a token covers at most the
        # longest vocabulary piece): checked before tokenizing, so a huge prompt is refused at once instead
        # of holding the hub while sentencepiece works through it. Computed here, at start-up.
        self.prompt_char_limit: int | None = (
            self.context_length * max(1, self._tokenizer.longest_piece_chars())
            if self._tokenizer is not None and self.context_length else None)

    # --- an LLM ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._llm_tokenizer().vocab_size

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self._llm_tokenizer().encode_chat(messages)

    def encode_prompt(self, text: str) -> list[int]:
        return self._llm_tokenizer().encode_prompt(text)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (logprobs' ``bytes``)."""
        return self._llm_tokenizer().token_bytes(token)

    def _llm_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise InvalidRequest(f"this server runs the model package '{self.name}', not an LLM")
        return self._tokenizer

    # --- a model package -----------------------------------------------------------------------

    @property
    def is_streaming(self) -> bool:
        """A package's IS_STREAMING_OUTPUT (an LLM always can stream)."""
        return bool(getattr(self._backend, "is_streaming", True))

    @property
    def input_schema(self) -> Any:
        """A package's INPUT_SCHEMA (models.package_schema.InputSchema); None for an LLM."""
        return getattr(self._backend, "input_schema", None)

    def parse_package_inputs(self, body: Any) -> dict[str, Any]:
        """Validate a package request body (KServe-v2 ``inputs`` list, ``{"inputs": {...}}`` or a plain
        object) against INPUT_SCHEMA. Raises InvalidRequest naming the field and the rule."""
        schema = self.input_schema
        if schema is None:
            raise InvalidRequest(f"this server runs the LLM '{self.name}': send a chat or completion body")
        return schema.parse(body)

    @property
    def prefix_cached_tokens(self) -> int:
        """Prompt tokens copied from a running request's cache instead of computed (prefix caching)."""
        runner = getattr(self._backend, "runner", None)
        return int(getattr(runner, "prefix_tokens_reused", 0))

    @property
    def drained_requests(self) -> int:
        """Package requests whose client left while ``infer`` ran on to its end (see models/package.py)."""
        return int(getattr(self._backend, "drained_requests", 0))

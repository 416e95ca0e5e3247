"""From a request body to what the engine runs: validated, tokenized, checked against the context.

Every route that runs the model comes through ``build_request``: the OpenAI routes, ``/v1/sse``,
``/v1/infer`` and the resumable streams. It raises ``models.errors`` types (InvalidRequest,
ContextLengthExceeded) before anything is submitted; service/errors.py turns them into 400s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.api import GenerationRequest, PackageRequest
from models.errors import ContextLengthExceeded, InvalidRequest
from models.serving import PACKAGE, ServedModel, prompt_error
from service.openai_schemas import ChatRequest, CompletionRequest, parse
from service.openai_stream import CHAT, COMPLETION, ResponseShape

AUTO = "auto"
KINDS = (CHAT, COMPLETION, PACKAGE, AUTO)


@dataclass(frozen=True)
class BuiltRequest:
    """A request ready to submit, and how its answer is shaped."""

    request: GenerationRequest | PackageRequest
    kind: str  # CHAT, COMPLETION or PACKAGE (AUTO resolved)
    stream: bool  # the body asked for a stream (a package always streams on /v1/sse)
    shape: ResponseShape | None = None  # OpenAI chunks for an LLM; None for a package's own dicts


def build_request(model: ServedModel, kind: str, body: Any, request_id: str, deadline: float) -> BuiltRequest:
    """Validate ``body`` for ``kind`` ("chat", "completion", "package" or "auto": what the served
    model takes: a package's inputs, else chat when the body has ``messages``, else a completion)."""
    if kind not in KINDS:
        raise ValueError(f"unknown request kind {kind!r}")
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    kind = resolve_kind(model, kind, body)
    if kind == PACKAGE:
        return BuiltRequest(PackageRequest(request_id, model.parse_package_inputs(body), deadline), PACKAGE, True)
    parsed: ChatRequest | CompletionRequest
    if kind == CHAT:
        parsed = parse(ChatRequest, body)
        messages = [m.for_template() for m in parsed.messages]
        refuse_oversized(model, sum(len(m["content"]) for m in messages), "messages")
        prompt_ids, prompt_param = model.encode_chat(messages), "messages"
    else:
        parsed = parse(CompletionRequest, body)
        prompt_ids, prompt_param = completion_prompt_ids(model, parsed.single_prompt()), "prompt"
    max_tokens = checked_max_tokens(model, prompt_ids, parsed.requested_max_tokens, prompt_param)
    request = GenerationRequest(request_id, prompt_ids, parsed.sampling(max_tokens), deadline)
    shape = ResponseShape(kind, request_id, model.name, include_usage=parsed.include_usage,
                          token_bytes=model.token_bytes if parsed.requested_logprobs is not None else None)
    return BuiltRequest(request, kind, parsed.stream, shape)


def resolve_kind(model: ServedModel, kind: str, body: dict[str, Any]) -> str:
    is_package = model.kind == PACKAGE
    if kind == AUTO:
        if is_package:
            return PACKAGE
        if "messages" in body:
            return CHAT
        if "prompt" in body:
            return COMPLETION
        raise InvalidRequest("the body needs 'messages' (a chat) or 'prompt' (a completion)", param="messages")
    if is_package and kind != PACKAGE:
        raise InvalidRequest(f"this server runs the model package '{model.name}', not an LLM: "
                             "POST its inputs to /v1/sse")
    if not is_package and kind == PACKAGE:
        raise InvalidRequest(f"this server runs the LLM '{model.name}': send a chat or completion body")
    return kind


def completion_prompt_ids(model: ServedModel, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        refuse_oversized(model, len(prompt), "prompt")
        return model.encode_prompt(prompt)
    if any(token >= model.vocab_size for token in prompt):
        raise InvalidRequest(f"prompt: token ids must be below the vocabulary size {model.vocab_size}",
                             param="prompt")
    return list(prompt)


def checked_max_tokens(model: ServedModel, prompt_ids: list[int], requested: int | None, prompt_param: str) -> int:
    """The prompt's checks (not empty, fits the context with room for the answer) -> max_tokens.

    Unset max_tokens means "until the model stops or the context is full" (bounded by the request
    timeout). The engine checks the prompt again (models/runner.py) for requests built elsewhere."""
    context = model.context_length
    problem = prompt_error(prompt_ids, context, prompt_param)
    if problem is not None:
        raise problem
    room = context - len(prompt_ids)
    max_tokens = requested or room
    if max_tokens > room:
        raise ContextLengthExceeded(
            f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's context "
            f"of {context} tokens; ask for at most {room}", param="max_tokens")
    return max_tokens


def refuse_oversized(model: ServedModel, characters: int, param: str) -> None:
    """Refuse, before tokenizing, a prompt too long for the context however it tokenizes."""
    if model.prompt_char_limit is not None and characters > model.prompt_char_limit:
        raise ContextLengthExceeded(
            f"the prompt is {characters} characters, more than this model's context of "
            f"{model.context_length} tokens can hold", param=param)

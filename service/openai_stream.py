"""OpenAI response objects: streamed chunks and whole (non-streaming) responses.

Pure dict building, no I/O: ``service/jobs.py`` feeds it the engine's events. Chat chunks carry
``delta.content`` (the first one also ``delta.role``); completion chunks carry ``text``. With
``stream_options.include_usage`` every chunk has ``"usage": null`` and one last chunk with no choices
carries the usage, as OpenAI does.
"""
from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.api import TokenLogprob
from service.sse import EncodedJSON, encode_json

CHAT, COMPLETION = "chat", "completion"
# Stands for the text while a text chunk's template is made: private-use characters, in no model's name.
_TEXT_MARK = "\ue000rivulet-text\ue000"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ResponseShape:
    """What every object of one response shares: kind, id, creation time, model name."""

    kind: str  # CHAT or COMPLETION
    request_id: str
    model: str
    include_usage: bool = False
    # Set when the request asked for logprobs: a token id's bytes (the tokenizer's token_bytes).
    token_bytes: Callable[[int], bytes] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _role_sent: bool = field(default=False, init=False, repr=False)  # the first delta carries the role
    _text_offset: int = field(default=0, init=False, repr=False)  # completions' logprobs.text_offset
    # A text chunk's encoding before and after its text (text_chunk's common case), made on first use.
    _template: tuple[str, str] | None = field(default=None, init=False, repr=False)

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.kind == CHAT else "cmpl-") + self.request_id

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == CHAT else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice is not None else [],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish_reason: str | None,
                logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        if self.kind == COMPLETION:
            return {"index": 0, "text": text or "", "logprobs": self._logprobs(logprobs, text or ""),
                    "finish_reason": finish_reason}
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def _token(self, token: int) -> tuple[str, bytes]:
        raw = self.token_bytes(token)
        # A byte-fallback token is often part of a character: shown escaped, as OpenAI does ("\\xe5").
        return raw.decode("utf-8", errors="backslashreplace"), raw

    def _logprobs(self, entries: tuple[TokenLogprob, ...], text: str = "") -> dict[str, Any] | None:
        """OpenAI's logprobs object of a choice: chat's ``content`` list, or completions' parallel lists
        (``text`` is what the client receives with these tokens: their ``text_offset`` points into it)."""
        if self.token_bytes is None or not entries:
            return None
        if self.kind == CHAT:
            content = []
            for entry in entries:
                token_text, raw = self._token(entry.token)
                top = [{"token": t, "logprob": lp, "bytes": list(b)}
                       for t, b, lp in ((*self._token(tok), lp) for tok, lp in entry.top)]
                content.append({"token": token_text, "logprob": entry.logprob, "bytes": list(raw), "top_logprobs": top})
            return {"content": content}
        tokens, offsets, tops = [], [], []
        # text_offset counts characters of the text the client received, not of the tokens' escaped
        # names: byte-fallback tokens ("\\xe6", "\\x97", "\\xa5") together are one character ("日"),
        # so a token's offset is where the characters its predecessors complete end.
        start, completed = self._text_offset, 0
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for entry in entries:
            token_text, raw = self._token(entry.token)
            tokens.append(token_text)
            offsets.append(start + min(completed, len(text)))
            completed += len(utf8.decode(raw))
            # The sampled token is always listed, so there may be N + 1 entries (as OpenAI says).
            tops.append({**{self._token(tok)[0]: lp for tok, lp in entry.top}, token_text: entry.logprob})
        self._text_offset = start + len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def text_chunk(self, text: str, logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        carries_role = self.kind == CHAT and not self._role_sent
        chunk = self._chunk(self._choice(text, None, logprobs))
        if logprobs or carries_role:
            return chunk
        # Every other text chunk of the stream is the same object but for its text: encode that alone.
        if self._template is None:
            marked = encode_json(self._chunk(self._choice(_TEXT_MARK, None)))
            before, after = marked.split(encode_json(_TEXT_MARK))
            self._template = before, after
        before, after = self._template
        return EncodedJSON(chunk, before + encode_json(text) + after)

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        """The chunk that carries the finish reason (its delta is empty unless nothing came before)."""
        return self._chunk(self._choice("" if not self._role_sent else None, finish_reason))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        chunk = self._chunk(None)
        chunk["usage"] = usage(prompt_tokens, completion_tokens)
        return chunk

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        """A non-streaming response."""
        if self.kind == CHAT:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(logprobs, text),
                      "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

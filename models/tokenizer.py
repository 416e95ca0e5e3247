"""Sentencepiece tokenizer, the incremental (UTF-8-safe) decoder, and chat prompt rendering."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import CheckpointError, InvalidRequest

# Used when a checkpoint has no chat_template (documented in README). Each message is a role line
# followed by its content; the prompt ends with the assistant's role line so the model answers.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A thin wrapper over sentencepiece: ``encode(text, bos, eos) -> list[int]``."""

    def __init__(self, model_path: Path, *, bos_id: int | None = None, eos_ids: tuple[int, ...] = (),
                 add_bos: bool = True, chat_template: str | None = None) -> None:
        if not model_path.is_file():
            raise CheckpointError(f"{model_path}: file is missing (a sentencepiece tokenizer.model)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{model_path}: not a sentencepiece model ({exc})") from None
        self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
        self.eos_ids = eos_ids or (self.sp.eos_id(),)
        self.add_bos = add_bos
        self._template = _compile(chat_template or BUILTIN_CHAT_TEMPLATE)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_token(self) -> str:
        return self.sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else ""

    @property
    def eos_token(self) -> str:
        return self.sp.id_to_piece(self.eos_ids[0])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_ids[0]]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``. Ids past the tokenizer's pieces decode to nothing: a checkpoint's
        ``vocab_size`` is often padded beyond its tokenizer, and a sampled padding id must not crash."""
        size = self.sp.vocab_size()
        if any(not 0 <= i < size for i in ids):
            ids = [i for i in ids if 0 <= i < size]
        return self.sp.decode(ids)

    def longest_piece_chars(self) -> int:
        """The most characters one token can stand for (a bound on the text a prompt of N tokens holds)."""
        return max(len(self.sp.id_to_piece(i)) for i in range(self.sp.get_piece_size()))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as logprobs report it: a byte-fallback piece is its one byte
        (often half a character), sentencepiece's word marker a space, a control token its name."""
        if not 0 <= token_id < self.sp.vocab_size():
            return b""
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:5], 16)])  # "<0xE4>"
        return self.sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8")

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: BOS (when the checkpoint asks for it) then the text."""
        return self.encode(text, bos=self.add_bos)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.render_chat(messages)
        # Templates write BOS as text; sentencepiece would not map it back to the control id.
        has_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        if has_bos:
            text = text[len(self.bos_token):]
        return self.encode(text, bos=has_bos or self.add_bos)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise CheckpointError(f"tokenizer_config.json: field 'chat_template' does not compile ({exc})") from None


# How many prompt tokens the incremental decoder keeps as context (see IncrementalDecoder).
DECODE_CONTEXT_TOKENS = 5


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas whose concatenation equals a full decode.

    Decodes a short window ``ids[prefix:]`` and emits what it adds beyond ``ids[prefix:read]``: both sides
    lose sentencepiece's leading space the same way, so spacing matches a full decode. A window that ends
    in U+FFFD is an incomplete UTF-8 character (byte-fallback pieces) and is held back.

    ``context`` is the tail of the prompt. It is decoded but never emitted, so the first generated
    token keeps the leading space a full decode of prompt + completion gives it (" world" after
    "Hello", not "world").
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] | tuple[int, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Take the next token. -> the text it completes (often "", never half a character)."""
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """What is still held back at the end of the stream (an incomplete character decodes as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


@dataclass
class StopMatcher:
    """Holds back text that might be the start of a stop string; reports a stop when one completes.

    Text is emitted only when it can no longer begin a stop string, so a match always lies entirely
    in the held part and nothing past a stop string ever reaches the client.
    """

    stops: tuple[str, ...]
    held: str = ""

    def __post_init__(self) -> None:
        self.stops = tuple(s for s in self.stops if s)  # an empty stop string would match at once

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit now, stopped)."""
        if not self.stops:
            return text, False
        self.held += text
        first = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            out, self.held = self.held[:first], ""
            return out, True
        keep = self._partial_suffix_length()
        out = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out

    def _partial_suffix_length(self) -> int:
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.held)), best, -1):
                if self.held.endswith(stop[:k]):
                    best = k
                    break
        return best

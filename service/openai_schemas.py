"""OpenAI request bodies (chat and completions), validated with pydantic v2.

Unknown fields are ignored (clients send many we do not use); known ones are checked strictly: a
string is not a number and ``true`` is not 1. OpenAI features the engine does not provide (``n`` > 1,
``echo``, ``best_of`` > 1) are refused with 400 rather than silently left out of the answer. ``parse``
turns pydantic's errors into one ``InvalidRequest`` that names the field, so clients see which input
was wrong.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from models.api import SamplingParams
from models.errors import InvalidRequest
from models.serving import INT64_MAX, INT64_MIN

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs (vLLM's default too)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """The fields chat and completions share."""

    model: str | None = None  # any name is accepted while one model is served
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 (or 0) = off
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # OpenAI's int64; torch takes no more
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # vLLM's and TGI's extension; 1 = off
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n = 1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value == "":
            raise ValueError("a stop string may not be empty")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        """None = no logprobs; N = the sampled token's and the N most likely alternatives'."""
        return None

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=-1 if self.top_k == 0 else self.top_k, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logprobs=self.requested_logprobs,
        )


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """What the chat template sees: role and plain-text content."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    # Newer OpenAI clients send this instead of max_tokens for chat.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Generation):
    # A string, token ids, or a list holding exactly one of those (OpenAI's batch form, batch of one).
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1, max_length=1)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]

    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Refused rather than ignored: an answer without what was asked for would look like a bug.
    echo: bool = False
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server; leave it unset")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of = 1 is supported")
        return value

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > 1 and all(isinstance(v, (str, list)) for v in value):
            raise ValueError("only one prompt per request is supported")
        return value

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt[0]
        return prompt


Body = TypeVar("Body", bound=BaseModel)


def parse(model: type[Body], body: Any) -> Body:
    """Validate ``body`` (already JSON-decoded) or raise ``InvalidRequest`` naming the bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        param, message = _describe(exc)
        raise InvalidRequest(f"{param or 'body'}: {message}", param=param) from None


# pydantic names the branch of a union it tried (``str``, ``list[int]``, ...) inside error locations.
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "TextPart"}


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(part for part in loc if isinstance(part, int) or ("[" not in part and part not in _TYPE_NAMES))


def _describe(exc: ValidationError) -> tuple[str | None, str]:
    """-> (the field's dotted path, what is wrong with it).

    For a union every branch reports; the branch that got deepest into the value is the one the client
    meant (``stop: [""]`` is a list with a bad item, not a bad string). When no branch got further than
    the field itself, all their complaints are listed.
    """
    errors = [(_field_path(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
    deepest = max(len(path) for path, _ in errors)
    first_path = next(path for path, _ in errors if len(path) == deepest)
    messages = [msg for path, msg in errors if path == first_path]
    param = ".".join(str(part) for part in first_path) or None
    if len(messages) > 1:
        return param, "invalid value (" + "; ".join(dict.fromkeys(messages)) + ")"
    return param, messages[0]

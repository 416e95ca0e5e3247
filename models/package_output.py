"""What a model package may send: JSON objects, every one with the keys and value types of the first.

Inferless requires every streamed output of a request to share one schema; Rivulet checks it instead of
letting a client meet a surprise halfway. Outputs are copied through JSON on the engine thread, so the
event handed to the web side is plain data that ``infer`` can no longer mutate, and a value JSON cannot
carry (a tensor, bytes, NaN) fails here with a message naming the key, not later inside a greenlet.
"""
from __future__ import annotations

import json
from typing import Any

from models.errors import ModelError

Signature = tuple[tuple[str, str], ...]
HINT = "send str, int, float, bool, None, lists or dicts (tensor.tolist(), tensor.item())"


def json_copy(output: object) -> dict[str, Any]:
    """A deep copy of ``output`` made of JSON types only. Raises ModelError naming the first bad key."""
    if not isinstance(output, dict):
        raise ModelError(f"an output must be a dict, not {type(output).__name__}")
    for key, value in output.items():
        if not isinstance(key, str):
            raise ModelError(f"output keys must be strings, not {type(key).__name__} ({key!r})")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:  # ValueError: NaN/Infinity or a circular reference
            raise ModelError(f"output {key!r} cannot be sent as JSON ({type(value).__name__}: {exc}); "
                             f"{HINT}") from None
    return json.loads(json.dumps(output, allow_nan=False))


def json_kind(value: Any) -> str:
    """A value's JSON type. Integers and floats are both numbers: 1 and 0.5 share a schema."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def signature(data: dict[str, Any]) -> Signature:
    return tuple(sorted((key, json_kind(value)) for key, value in data.items()))


class OutputSchema:
    """Fixed by a request's first output; every later one must match it."""

    def __init__(self) -> None:
        self.fixed: Signature | None = None

    def check(self, data: dict[str, Any]) -> None:
        now = signature(data)
        if self.fixed is None:
            self.fixed = now
        elif now != self.fixed:
            raise ModelError(f"the output schema changed mid-stream ({describe_change(self.fixed, now)}); "
                             "every output of a request must have the keys and value types of the first")


def describe_change(before: Signature, after: Signature) -> str:
    old, new = dict(before), dict(after)
    parts = []
    if added := sorted(set(new) - set(old)):
        parts.append("new keys " + ", ".join(map(repr, added)))
    if missing := sorted(set(old) - set(new)):
        parts.append("missing keys " + ", ".join(map(repr, missing)))
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key]:
            parts.append(f"{key!r} was {old[key]}, now {new[key]}")
    return "; ".join(parts)

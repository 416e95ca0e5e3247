"""Reading event streams in tests with httpx-sse (a maintained SSE parser), from bytes or a live response."""
from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent

DONE = "[DONE]"


def events_from_bytes(data: bytes) -> list[ServerSentEvent]:
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)
    return list(EventSource(response).iter_sse())


def payloads(events: list[ServerSentEvent]) -> list[Any]:
    """Each event's data: decoded JSON, or the literal ``[DONE]``."""
    return [event.data if event.data == DONE else json.loads(event.data) for event in events]


def chat_text(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if isinstance(c, dict) and c.get("choices"))


def completion_text(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks if isinstance(c, dict) and c.get("choices"))

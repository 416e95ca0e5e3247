"""SSE framing: the wire format, and that no payload can break out of its event."""
from __future__ import annotations

import json
import re

import pytest
from httpx_sse._decoders import SSEDecoder

from service import sse


def decode(stream: bytes) -> list:
    """Parse a byte stream the way an SSE client does (httpx-sse's decoder)."""
    decoder = SSEDecoder()
    events = []
    *lines, unterminated = re.split(r"\r\n|\r|\n", stream.decode("utf-8"))
    assert unterminated == ""
    for line in lines:
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


def test_event_has_id_and_json_data():
    frame = sse.event({"a": 1, "text": "héllo"}, id=7)
    assert frame == 'id: 7\ndata: {"a":1,"text":"héllo"}\n\n'.encode("utf-8")


@pytest.mark.parametrize("text", [
    "line one\nline two",
    "\n\ndata: [DONE]\n\n",
    "id: 99\r\nevent: done\r\n\r\n",
    "\rretry: 1\r",
    "emoji 🌊 and \u2028 separators \u2029",
])
def test_model_text_cannot_forge_events(text):
    frame = sse.event({"choices": [{"delta": {"content": text}}]}, id=1)
    body = frame[:-2]  # the blank line that ends the event
    assert b"\n" not in body.split(b"\n", 1)[1]  # nothing but "id" and one "data" line
    assert b"\r" not in frame
    events = decode(frame)
    assert len(events) == 1
    assert events[0].id == "1"
    assert json.loads(events[0].data)["choices"][0]["delta"]["content"] == text
    assert frame.decode("utf-8").splitlines() == frame.decode("utf-8").split("\n")[:-1]  # even U+2028 splitters


def test_lone_surrogate_is_escaped_not_fatal():
    frame = sse.event({"text": "bad \udc80 byte"}, id=1)
    assert json.loads(decode(frame)[0].data)["text"] == "bad \udc80 byte"


@pytest.mark.parametrize("kwargs", [
    {"data": "two\nlines"},
    {"data": "x", "id": "1\n2"},
    {"data": "x", "name": "a\rb"},
    {"data": "x", "id": "nul\0"},
])
def test_strings_with_line_breaks_are_refused(kwargs):
    data = kwargs.pop("data")
    with pytest.raises(ValueError):
        sse.event(data, **kwargs)


def test_done_marker_and_named_event():
    assert sse.event(sse.DONE, id=3, name="done") == b"event: done\nid: 3\ndata: [DONE]\n\n"


def test_comment_and_retry_never_dispatch_an_event_of_their_own():
    first = sse.event({"x": 1}, id=1)
    stream = sse.retry(1500) + sse.comment("ping") + first + sse.comment("ping") + sse.comment("ping") \
        + sse.event(sse.DONE, id=2)
    assert stream.startswith(b"retry: 1500\n: ping\nid: 1\n")
    events = decode(stream)
    # A blank line after a comment would make parsers that keep the last id (openai's) emit an empty event.
    assert [e.data for e in events] == ['{"x":1}', "[DONE]"]
    assert events[0].retry == 1500


def test_event_ids_count_per_stream():
    ids = sse.EventIds()
    frames = [ids.event({"n": n}) for n in range(3)] + [ids.event(sse.DONE)]
    assert [e.id for e in decode(b"".join(frames))] == ["1", "2", "3", "4"]
    assert sse.EventIds(last=41).event("x").startswith(b"id: 42\n")


def test_response_headers(app):
    with app.test_request_context():
        response = sse.response(iter([sse.retry()]))
    assert response.headers["Content-Type"] == "text/event-stream;charset=UTF-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.is_streamed


def test_openai_sdk_parses_pings_between_events():
    """The openai SDK keeps the last event id and would turn a blank line after a comment into an empty
    event it cannot decode; pings and retry must therefore never end with a blank line of their own."""
    import httpx
    import openai
    from openai.types.chat import ChatCompletionChunk

    def chunk(text):
        return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}

    ids = sse.EventIds()
    body = (sse.retry() + sse.comment() + ids.event(chunk("a")) + sse.comment() + sse.comment()
            + ids.event(chunk("b")) + sse.comment() + ids.event(sse.DONE))
    request = httpx.Request("POST", "http://test/v1/chat/completions")
    response = httpx.Response(200, headers={"content-type": sse.CONTENT_TYPE}, content=body, request=request)
    with openai.OpenAI(api_key="x", base_url="http://test/v1") as client:
        stream = openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client)
        assert [c.choices[0].delta.content for c in stream] == ["a", "b"]

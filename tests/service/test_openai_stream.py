"""OpenAI response objects with logprobs: chat's content list and completions' parallel lists."""
from __future__ import annotations

import json

import pytest

from models.api import TokenLogprob
from service.openai_stream import CHAT, COMPLETION, ResponseShape
from service.sse import encode_json

TOKEN_BYTES = {7: b" Hi", 8: b"\xe5", 9: b"!"}.__getitem__
ENTRIES = (TokenLogprob(7, -0.5, ((7, -0.5), (9, -1.5))), TokenLogprob(8, -0.25, ((8, -0.25),)))


def test_without_logprobs_asked_the_field_is_null():
    shape = ResponseShape(CHAT, "r", "m")
    assert shape.text_chunk("Hi", ENTRIES)["choices"][0]["logprobs"] is None


def test_chat_logprobs_list_every_token_with_bytes_and_alternatives():
    shape = ResponseShape(CHAT, "r", "m", token_bytes=TOKEN_BYTES)
    logprobs = shape.text_chunk(" Hi", ENTRIES)["choices"][0]["logprobs"]
    assert logprobs == {"content": [
        {"token": " Hi", "logprob": -0.5, "bytes": [32, 72, 105], "top_logprobs": [
            {"token": " Hi", "logprob": -0.5, "bytes": [32, 72, 105]},
            {"token": "!", "logprob": -1.5, "bytes": [33]}]},
        # Half a character: the bytes are exact, the token text escaped, as OpenAI shows it.
        {"token": "\\xe5", "logprob": -0.25, "bytes": [229], "top_logprobs": [
            {"token": "\\xe5", "logprob": -0.25, "bytes": [229]}]},
    ]}
    # A chunk that carries no token (the final one) has none.
    assert shape.final_chunk("stop")["choices"][0]["logprobs"] is None


def test_completion_logprobs_are_parallel_lists_with_offsets_across_chunks():
    shape = ResponseShape(COMPLETION, "r", "m", token_bytes=TOKEN_BYTES)
    first = shape.text_chunk(" Hi", ENTRIES[:1])["choices"][0]["logprobs"]
    second = shape.text_chunk("!", (TokenLogprob(9, -2.0, ()),))["choices"][0]["logprobs"]
    assert first == {"tokens": [" Hi"], "token_logprobs": [-0.5], "top_logprobs": [{" Hi": -0.5, "!": -1.5}],
                     "text_offset": [0]}
    # The sampled token is always in top_logprobs, even with no alternatives asked for.
    assert second == {"tokens": ["!"], "token_logprobs": [-2.0], "top_logprobs": [{"!": -2.0}], "text_offset": [3]}


def test_a_whole_response_carries_all_the_logprobs():
    shape = ResponseShape(CHAT, "r", "m", token_bytes=TOKEN_BYTES)
    whole = shape.whole(" Hi", "length", 3, 2, ENTRIES)
    assert [e["logprob"] for e in whole["choices"][0]["logprobs"]["content"]] == [-0.5, -0.25]


def test_completion_text_offsets_count_the_characters_the_client_received():
    # "日" is three byte-fallback tokens; the client receives one character, not three "\\xNN" names.
    token_bytes = {1: b" A", 2: b"\xe6", 3: b"\x97", 4: b"\xa5", 5: b"B", 6: b"!"}.__getitem__
    shape = ResponseShape(COMPLETION, "r", "m", token_bytes=token_bytes)
    first = shape.text_chunk(" A日B", tuple(TokenLogprob(t, -1.0, ()) for t in (1, 2, 3, 4, 5)))
    logprobs = first["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" A", "\\xe6", "\\x97", "\\xa5", "B"]  # names stay escaped, as OpenAI's
    assert logprobs["text_offset"] == [0, 2, 2, 2, 3]  # " A" | 日 (its three bytes start at 2) | B
    second = shape.text_chunk("!", (TokenLogprob(6, -1.0, ()),))["choices"][0]["logprobs"]
    assert second["text_offset"] == [4]  # len(" A日B"): offsets continue across chunks
    whole = ResponseShape(COMPLETION, "r", "m", token_bytes=token_bytes).whole(
        " A日B!", "length", 1, 6, tuple(TokenLogprob(t, -1.0, ()) for t in range(1, 7)))
    assert whole["choices"][0]["logprobs"]["text_offset"] == [0, 2, 2, 2, 3, 4]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("kind", [CHAT, COMPLETION])
def test_text_chunks_made_from_a_template_encode_as_their_fields_say(kind, include_usage):
    """After the first, a stream's text chunks are encoded from a template, only their text encoded anew:
    the bytes must be those of the object itself, whatever the text or the model's name hold."""
    shape = ResponseShape(kind, "r-1", 'a "model" \u00e9\u2028', include_usage=include_usage)
    for text in ["Hi", " there", "", ' "quoted"\n', "\u65e5\u672c\u2028\x85", "\\", "\ue000rivulet-text\ue000"]:
        chunk = shape.text_chunk(text)
        assert encode_json(chunk) == encode_json(dict(chunk))  # dict(): encoded field by field
        assert json.loads(encode_json(chunk)) == chunk
        assert (chunk["choices"][0]["delta"]["content"] if kind == CHAT else chunk["choices"][0]["text"]) == text
    if kind == CHAT:  # a chat stream's first chunk carries the role, so it is not made from the template
        assert ResponseShape(kind, "r-2", "m").text_chunk("Hi")["choices"][0]["delta"] == {
            "role": "assistant", "content": "Hi"}

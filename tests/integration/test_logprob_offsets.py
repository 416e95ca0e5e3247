"""Completions logprobs over real HTTP: text_offset points into the text the client received."""
from __future__ import annotations

import json
import re

import requests

BYTE_TOKEN = re.compile(r"\\x[0-9a-f]{2}")


def test_text_offsets_index_the_received_text_streamed_and_whole(demo_server):
    # The demo model answers this prompt with CJK characters, several spelled as byte-fallback tokens.
    body = {"prompt": "中文", "max_tokens": 24, "temperature": 0, "logprobs": 1}
    whole = requests.post(demo_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    text, logprobs = whole["text"], whole["logprobs"]
    assert text and len(logprobs["tokens"]) == len(logprobs["text_offset"]) == 24
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(text)
    assert any(BYTE_TOKEN.fullmatch(token) for token in logprobs["tokens"])
    for token, offset in zip(logprobs["tokens"], offsets):
        if BYTE_TOKEN.fullmatch(token):  # one byte of the character at its offset
            assert int(token[2:], 16) in text[offset].encode()
        else:  # a whole-character token is the text at its offset
            assert text[offset:offset + len(token)] == token

    streamed_text, streamed_offsets = "", []
    with requests.post(demo_server.url + "/v1/completions", json={**body, "stream": True}, stream=True,
                       timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                streamed_text += choice["text"]
                if choice["logprobs"]:
                    streamed_offsets += choice["logprobs"]["text_offset"]
    assert (streamed_text, streamed_offsets) == (text, offsets)

"""The official ``openai`` Python SDK, unchanged, against the real server."""
from __future__ import annotations

import openai
import pytest

MESSAGES = [{"role": "user", "content": "你是谁?"}]


@pytest.fixture
def sdk(demo_server):
    with openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_sdk_streams_chat_completions(sdk):
    stream = sdk.chat.completions.create(model="test", messages=MESSAGES, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True, "top_k": -1})
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(with_text) > 1  # several chunks, not one
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12
    whole = sdk.chat.completions.create(model="test", messages=MESSAGES, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.usage.completion_tokens == 12


def test_sdk_streams_completions(sdk):
    chunks = list(sdk.completions.create(model="test", prompt="Once", max_tokens=5, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].text) >= 1


def test_sdk_sees_errors_as_exceptions(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="test", messages=MESSAGES, max_tokens=10**6)
    assert caught.value.code == "context_length_exceeded"


def test_sdk_lists_models(sdk):
    assert [m.id for m in sdk.models.list()] == ["demo"]


def test_sdk_reads_logprobs_streamed_and_whole(sdk):
    """Each streamed token's logprob arrives with it; the whole answer lists the same ones."""
    kwargs = dict(model="test", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body={"ignore_eos": True})
    chunks = [c for c in sdk.chat.completions.create(stream=True, **kwargs) if c.choices and c.choices[0].logprobs]
    streamed = [entry for c in chunks for entry in c.choices[0].logprobs.content]
    whole = sdk.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(streamed) == len(whole) == 8
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]
    for entry in whole:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        # Greedy: the sampled token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.encode() == b"".join(bytes(e.bytes) for e in streamed)

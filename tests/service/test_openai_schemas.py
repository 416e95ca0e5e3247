"""Request validation: what is accepted, what becomes which sampling parameters, what is refused and why."""
from __future__ import annotations

import pytest

from models.errors import InvalidRequest
from service.openai_schemas import ChatRequest, CompletionRequest, parse

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_modelarts_seed_body_is_valid_and_means_greedy():
    body = {"model": "test", "messages": [{"role": "user", "content": "你是谁?"}], "max_tokens": 100,
            "top_k": -1, "top_p": 1, "temperature": 0, "ignore_eos": False, "stream": False}
    request = parse(ChatRequest, body)
    params = request.sampling(request.requested_max_tokens)
    assert params.greedy and params.max_tokens == 100 and params.top_k == -1 and params.top_p == 1.0
    assert not request.stream and not params.ignore_eos


def test_all_sampling_fields_reach_the_engine():
    request = parse(ChatRequest, {**CHAT, "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                                  "seed": 3, "stop": ["\n", "END"], "ignore_eos": True, "stream": True,
                                  "stream_options": {"include_usage": True}})
    params = request.sampling(7)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.7, 0.9, 40, 3)
    assert params.stop == ("\n", "END") and params.ignore_eos and request.stream and request.include_usage


def test_unknown_fields_are_ignored_and_model_is_free():
    request = parse(ChatRequest, {**CHAT, "model": "anything", "user": "u", "tools": []})
    assert request.model == "anything"


def test_penalties_reach_the_engine():
    params = parse(CompletionRequest, {"prompt": "x", "presence_penalty": 1, "frequency_penalty": -0.5,
                                       "repetition_penalty": 1.2}).sampling(4)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (1.0, -0.5, 1.2)
    assert params.penalised and not parse(ChatRequest, CHAT).sampling(4).penalised


def test_defaults():
    request = parse(ChatRequest, CHAT)
    assert request.requested_max_tokens is None and not request.stream and not request.include_usage
    params = request.sampling(10)
    assert (params.temperature, params.top_p, params.top_k, params.stop) == (1.0, 1.0, -1, ())


def test_single_stop_string_and_top_k_zero_means_off():
    params = parse(ChatRequest, {**CHAT, "stop": "###", "top_k": 0}).sampling(5)
    assert params.stop == ("###",) and params.top_k == -1


def test_max_completion_tokens_is_accepted_for_chat():
    assert parse(ChatRequest, {**CHAT, "max_completion_tokens": 9}).requested_max_tokens == 9


def test_message_content_parts_and_developer_role():
    request = parse(ChatRequest, {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert [m.for_template() for m in request.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize("prompt, expected", [
    ("hello", "hello"), (["hello"], "hello"), ([1, 2, 3], [1, 2, 3]), ([[4, 5]], [4, 5]),
])
def test_completion_prompt_forms(prompt, expected):
    assert parse(CompletionRequest, {"prompt": prompt}).single_prompt() == expected


@pytest.mark.parametrize("body, param, words", [
    ({}, "messages", "Field required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "'user'"),
    ({"messages": [{"content": "x"}]}, "messages.0.role", "Field required"),
    ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({**CHAT, "max_tokens": "10"}, "max_tokens", "valid integer"),
    ({**CHAT, "max_tokens": 1.5}, "max_tokens", "valid integer"),
    ({**CHAT, "temperature": -0.1}, "temperature", "greater than or equal to 0"),
    ({**CHAT, "temperature": "hot"}, "temperature", "valid number"),
    ({**CHAT, "top_p": 0}, "top_p", "greater than 0"),
    ({**CHAT, "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({**CHAT, "top_k": -2}, "top_k", "greater than or equal to -1"),
    ({**CHAT, "seed": "x"}, "seed", "valid integer"),
    ({**CHAT, "seed": 2**63}, "seed", "less than or equal to 9223372036854775807"),  # was a 500 (torch overflow)
    ({**CHAT, "seed": -(2**63) - 1}, "seed", "greater than or equal to"),
    ({**CHAT, "stop": ""}, "stop", "may not be empty"),
    ({**CHAT, "stop": [""]}, "stop.0", "at least 1 character"),
    ({**CHAT, "stop": ["a"] * 17}, "stop", "at most 16"),
    ({**CHAT, "ignore_eos": "yes"}, "ignore_eos", "valid boolean"),
    ({**CHAT, "stream": 1}, "stream", "valid boolean"),
    ({**CHAT, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage", "valid boolean"),
    ({**CHAT, "n": 2}, "n", "only n = 1"),
    ({**CHAT, "logprobs": "yes"}, "logprobs", "valid boolean"),
    ({**CHAT, "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({**CHAT, "frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({**CHAT, "repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({**CHAT, "top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
])
def test_bad_chat_bodies_name_the_field(body, param, words):
    with pytest.raises(InvalidRequest) as caught:
        parse(ChatRequest, body)
    assert caught.value.param == param
    assert caught.value.message.startswith(param + ":")
    assert words in caught.value.message


@pytest.mark.parametrize("body, param, words", [
    ({}, "prompt", "Field required"),
    ({"prompt": 5}, "prompt", "valid string"),
    ({"prompt": None}, "prompt", "valid string"),
    ({"prompt": ["a", "b"]}, "prompt", "only one prompt"),
    ({"prompt": [-1]}, "prompt.0", "greater than or equal to 0"),
    ({"prompt": "x", "logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ({"prompt": "x", "echo": True}, "echo", "not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "only best_of = 1"),
])
def test_bad_completion_bodies_name_the_field(body, param, words):
    with pytest.raises(InvalidRequest) as caught:
        parse(CompletionRequest, body)
    assert caught.value.param == param
    assert words in caught.value.message


def test_logprobs_reach_the_engine_as_the_number_of_alternatives():
    assert parse(ChatRequest, CHAT).sampling(4).logprobs is None
    assert parse(ChatRequest, {**CHAT, "logprobs": True}).sampling(4).logprobs == 0
    assert parse(ChatRequest, {**CHAT, "logprobs": True, "top_logprobs": 5}).sampling(4).logprobs == 5
    assert parse(CompletionRequest, {"prompt": "x", "logprobs": 3}).sampling(4).logprobs == 3


def test_unused_features_left_at_their_off_values_are_accepted():
    """What SDKs and Postman collections send by default must not be refused."""
    for top_logprobs in (None, 0):
        chat = parse(ChatRequest, {**CHAT, "logprobs": False, "top_logprobs": top_logprobs, "n": 1})
        assert chat.sampling(4).logprobs is None
    completion = parse(CompletionRequest, {"prompt": "x", "logprobs": None, "echo": False, "best_of": 1})
    assert completion.single_prompt() == "x" and completion.sampling(4).logprobs is None
    # logprobs: 0 is not "off" for completions: the sampled token's own logprob, no alternatives.
    assert parse(CompletionRequest, {"prompt": "x", "logprobs": 0}).sampling(4).logprobs == 0


@pytest.mark.parametrize("body", [None, [], "text", 3])
def test_body_must_be_an_object(body):
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse(ChatRequest, body)

"""API keys on the real server: every route but the probes needs one; keys never reach the log."""
from __future__ import annotations

import time

import openai
import pytest
import requests

from tests.live_server import live_server

KEYS = "first-secret-key,second-secret-key"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server({"RIVULET_API_KEYS": KEYS}, log_dir=tmp_path_factory.mktemp("auth")) as srv:
        yield srv


@pytest.mark.parametrize("headers", [
    {}, {"X-Auth-Token": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "first-secret-key"},
])
@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/sse"), ("GET", "/v1/models"),
])
def test_without_a_valid_key_401(server, headers, method, path):
    response = requests.request(method, server.url + path, json=CHAT, headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("headers", [{"X-Auth-Token": "first-secret-key"},
                                     {"Authorization": "Bearer second-secret-key"}])
def test_either_header_and_either_key(server, headers):
    response = requests.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_need_no_key(server, path):
    assert requests.get(server.url + path, timeout=10).status_code == 200


def test_openai_sdk_with_the_key(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="second-secret-key", max_retries=0) as client:
        chunks = list(client.chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=3,
                                                     stream=True, extra_body={"ignore_eos": True}))
        assert chunks[-1].choices[0].finish_reason == "length"
    with openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=3)


def test_keys_never_reach_the_log(server):
    response = requests.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10,
                             headers={"X-Auth-Token": "a-wrong-guess", "X-Request-Id": "guess-1"})
    assert response.status_code == 401
    deadline = time.monotonic() + 10
    while '"guess-1"' not in (log := server.log()):  # the line is written when the response is closed
        assert time.monotonic() < deadline, "no request log line"
        time.sleep(0.05)
    assert '"status":401' in log and '"status":200' in log
    for secret in ("first-secret-key", "second-secret-key", "a-wrong-guess"):
        assert secret not in log

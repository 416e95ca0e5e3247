"""Prefix caching over HTTP: a request whose prompt begins like a running one's gets the text it gets
alone, and /metrics counts the prompt tokens it copied instead of computing."""
from __future__ import annotations

import requests

from tests.integration.streams import metric, read_until, send_request

SYSTEM = ("You are a careful assistant for a small bakery. Answer questions about bread, cakes, opening "
          "hours and orders. Be brief, be kind, never invent prices, and say when you do not know. ") * 3


def completion(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    response = requests.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_a_prompt_sharing_a_running_requests_prefix_gets_its_own_answer_and_is_counted(demo_server):
    question = SYSTEM + "Question: when do you open on Sundays?"
    alone = completion(demo_server.url, question)  # nothing running shares its prefix
    before = metric(demo_server, "rivulet_prefix_cached_tokens_total")
    running = send_request(demo_server, "/v1/completions",
                           {"prompt": SYSTEM + "Question: do you bake rye bread?", "max_tokens": 250,
                            "ignore_eos": True, "stream": True})
    try:
        read_until(running, b"data: {")  # it is decoding: its row holds the system prompt
        shared = completion(demo_server.url, question)
    finally:
        running.close()
    assert shared == alone
    assert metric(demo_server, "rivulet_prefix_cached_tokens_total") - before >= 64

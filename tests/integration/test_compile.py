"""Compilers under gunicorn's gevent worker, on the engine thread (where gevent's patched process functions
cannot start one): the native CPU kernels (models/native_build.py) build at start-up by default; with
RIVULET_COMPILE the decode step compiles, the batch-1 step also ahead of time (AOTInductor, with the
native kernels off: their one-row step would serve batch 1 instead), and the server gives the same tokens."""
from __future__ import annotations

import concurrent.futures

import pytest
import requests

from tests.live_server import live_server

PROMPTS = ["Once upon a time", "The little fox ran into the forest and saw a big tree with"]


def completion(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    response = requests.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def answers(url: str) -> list[str]:
    """Each prompt alone (batch 1), then both at once (rows of two lengths)."""
    alone = [completion(url, prompt) for prompt in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda prompt: completion(url, prompt), PROMPTS))
    return alone + together


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_compiled_server_compiles_at_start_up_and_answers_as_an_eager_one(tmp_path):
    with live_server({"RIVULET_MAX_BATCH": "4"}, log_dir=tmp_path) as eager:
        expected = answers(eager.url)
        assert "native CPU kernels:" in eager.log()  # not "unavailable"
    assert expected[:2] == expected[2:]  # greedy: batching changes no answer
    # A cache of its own: compiled kernels cached by an earlier run would hide a compiler that cannot start.
    env = {"RIVULET_MAX_BATCH": "4", "RIVULET_COMPILE": "true", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "RIVULET_NATIVE_KERNELS": "false"}
    with live_server(env, log_dir=tmp_path, ready_timeout=300) as compiled:
        assert "RIVULET_COMPILE: decode step compiled" in compiled.log()  # not "did not compile"
        assert "RIVULET_COMPILE: batch-1 step compiled ahead of time" in compiled.log()
        assert answers(compiled.url) == expected

"""A hang-up must never leak one request's output into the next (Inferless's LLM streaming template).

The template keeps one transformers ``TextIteratorStreamer`` on ``self`` and runs ``model.generate`` on a
thread. If a hang-up stopped ``infer`` early, the abandoned generation would go on filling that shared
streamer and the next caller would read its leftovers. Rivulet drains such packages instead; a package
that opts in to stopping early (``RAISE_ON_CANCEL``) must keep nothing across requests, and does here.
Both run under the real server, against a tiny random Llama checkpoint written by the test.
"""
from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from httpx_sse import connect_sse

from tests.live_server import LiveServer, live_server

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ROOT / "tests" / "fixtures" / "packages"
DEMO_TOKENIZER = ROOT / "models" / "demo" / "tokenizer.model"
WAIT_S = 60
OWN = {"prompt": "The quick brown fox", "max_new_tokens": 12}
# Long and slow enough (600 tokens, 5 ms apart) to be mid-generation when its client hangs up.
ABANDONED = {"prompt": "Once upon a time", "max_new_tokens": 600, "delay_ms": 5}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    directory = tmp_path_factory.mktemp("hf-streamer-checkpoint")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copyfile(DEMO_TOKENIZER, directory / "tokenizer.model")
    return directory


def serve(package: str, checkpoint: Path, tmp_path_factory, log: Path):
    env = {"RIVULET_MODEL": str(PACKAGES / package), "RIVULET_DEVICE": "cpu", "RIVULET_HEARTBEAT_S": "0.2",
           "HF_STREAMER_CHECKPOINT": str(checkpoint), "MISBEHAVING_PACKAGE_LOG": str(log)}
    with live_server(env, log_dir=tmp_path_factory.mktemp(package)) as server:
        yield server


@pytest.fixture(scope="module")
def package_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-streamer") / "package.log"


@pytest.fixture(scope="module")
def template(checkpoint, tmp_path_factory, package_log):
    yield from serve("hf_streamer", checkpoint, tmp_path_factory, package_log)


@pytest.fixture(scope="module")
def stops_early(checkpoint, tmp_path_factory, package_log):
    yield from serve("hf_streamer_stops_early", checkpoint, tmp_path_factory, package_log)


def streamed_text(server: LiveServer, body: dict) -> str:
    with httpx.Client(timeout=WAIT_S) as client, \
            connect_sse(client, "POST", server.url + "/v1/sse", json=body) as source:
        events = [event.data for event in source.iter_sse()]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events
    return "".join(httpx.Response(200, content=e).json()["OUT"] for e in events[:-1])


def hang_up_after_first_event(server: LiveServer, body: dict) -> None:
    """Start a stream on a raw socket, read until its first data event, then close the connection."""
    url = urlparse(server.url)
    payload = httpx.Request("POST", server.url + "/v1/sse", json=body)
    with socket.create_connection((url.hostname, url.port), timeout=WAIT_S) as sock:
        head = (f"POST /v1/sse HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload.content)}\r\n\r\n").encode()
        sock.sendall(head + payload.content)
        received = b""
        while b"\ndata: " not in received:
            chunk = sock.recv(4096)
            assert chunk, f"the stream ended before its first event: {received!r}"
            received += chunk


def metric(server: LiveServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=WAIT_S).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def cancelled_count(server: LiveServer) -> float:
    return metric(server, "rivulet_requests_cancelled_total")


@pytest.mark.parametrize("server_name", ["template", "stops_early"])
def test_a_hang_up_mid_generation_never_reaches_the_next_request(server_name, request):
    server = request.getfixturevalue(server_name)
    own = streamed_text(server, OWN)
    assert own.strip() and streamed_text(server, OWN) == own  # greedy: the same text every time
    before = cancelled_count(server)
    hang_up_after_first_event(server, ABANDONED)
    deadline = time.monotonic() + WAIT_S
    while cancelled_count(server) == before and time.monotonic() < deadline:
        time.sleep(0.05)  # the server notices the hang-up at its next write or heartbeat
    assert cancelled_count(server) == before + 1
    assert streamed_text(server, OWN) == own  # exactly its own text, nothing of the abandoned one's
    # the template was drained (its infer ran on to the end); the opt-in stopped instead
    assert metric(server, "rivulet_package_drained_total") == (1.0 if server_name == "template" else 0.0)


def test_the_template_is_drained_and_the_opt_in_stops_early(template, stops_early, package_log):
    # The parametrized test above ran both; the stopping package recorded how far each generation went.
    lines = package_log.read_text().splitlines() if package_log.exists() else []
    abandoned = [int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(ABANDONED["prompt"])]
    assert abandoned and all(n < ABANDONED["max_new_tokens"] for n in abandoned), lines

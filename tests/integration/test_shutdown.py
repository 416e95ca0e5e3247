"""SIGTERM with open streams: short ones finish, the rest end with a shutdown event and [DONE], none is cut.

gunicorn's grace time is shortened on its command line (``--graceful-timeout``, which overrides
gunicorn.conf.py); the worker ends the streams still open shortly before it runs out. The long streams
ask for more tokens than any machine generates within the grace time (tests/integration/long_model.py),
so which stream ends how is known in advance: the short one finishes, every long one is ended.
"""
from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
from httpx_sse import connect_sse

from tests.integration.long_model import ENDLESS_TOKENS, long_context_demo
from tests.integration.streams import metric
from tests.live_server import live_server
from tests.sse_client import DONE, payloads

# Streams still open are ended 4 s after SIGTERM (service.lifecycle.shutdown_delay): time enough for
# the short stream's tokens on a loaded machine, while it is surely still running when SIGTERM comes.
GRACE_S = 6
SHORT_TOKENS = 150
PROMPT = [{"role": "user", "content": "Keep talking."}]


def test_sigterm_ends_every_open_stream_cleanly(tmp_path):
    model = long_context_demo(tmp_path / "model")
    env = {"RIVULET_MODEL": str(model), "RIVULET_MAX_BATCH": "2", "RIVULET_REQUEST_TIMEOUT_S": "120"}
    with live_server(env, log_dir=tmp_path, extra_args=("--graceful-timeout", str(GRACE_S))) as server:
        short = {"messages": PROMPT, "max_tokens": SHORT_TOKENS, "ignore_eos": True, "temperature": 0,
                 "stream": True, "stream_options": {"include_usage": True}}
        long = {**short, "max_tokens": ENDLESS_TOKENS}
        first_token = concurrent.futures.Future()

        def read(body, signal_first_token=False):
            # Connection: close, as a client that is done would: an idle keep-alive would hold the worker.
            with httpx.Client(timeout=60, headers={"Connection": "close"}) as client:
                with connect_sse(client, "POST", server.url + "/v1/chat/completions", json=body) as source:
                    events = []
                    for event in source.iter_sse():
                        events.append(event)
                        if signal_first_token and not first_token.done():
                            first_token.set_result(True)
                    return payloads(events)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            short_stream = pool.submit(read, short, True)
            first_token.result(timeout=60)  # the short one is running
            long_streams = [pool.submit(read, long) for _ in range(5)]  # one runs beside it, four queue
            # Every stream open before SIGTERM (on a very fast machine the short one may be done already).
            deadline = time.monotonic() + 30
            while metric(server, "rivulet_open_streams") + short_stream.done() < 6:
                assert time.monotonic() < deadline, "the streams never opened"
                time.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            results = [short_stream.result(timeout=60)] + [f.result(timeout=60) for f in long_streams]
        returncode = server.proc.wait(timeout=30)
        log = server.log()

    for chunks in results:
        assert chunks[-1] == DONE
        assert DONE not in chunks[:-1]
    # Running generations may finish within the grace time: the short one does, all of it.
    short_chunks = results[0]
    assert short_chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert short_chunks[-2]["usage"]["completion_tokens"] == SHORT_TOKENS
    # None of the long ones can, the one running beside it or the four queued: each is ended.
    shutdown = {"error": {"message": "the server is shutting down; retry the request", "type": "shutdown",
                          "code": "shutdown"}}
    for chunks in results[1:]:
        assert chunks[-2] == shutdown
        assert all("error" not in c and (not c["choices"] or c["choices"][0]["finish_reason"] is None)
                   for c in chunks[:-2])
    assert returncode == 0
    assert "draining" in log
    assert "Worker graceful timeout" not in log  # every stream ended before gunicorn had to cut one

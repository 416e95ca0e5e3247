"""SIGTERM with open streams: short ones finish, the rest end with a shutdown event and [DONE], none is cut.

gunicorn's grace time is shortened on its command line (``--graceful-timeout``, which overrides
gunicorn.conf.py); the worker ends the streams still open shortly before it runs out.
"""
from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
from httpx_sse import connect_sse

from tests.integration.streams import metric
from tests.live_server import live_server
from tests.sse_client import DONE, payloads

GRACE_S = 4
PROMPT = [{"role": "user", "content": "Keep talking."}]


def test_sigterm_ends_every_open_stream_cleanly(tmp_path):
    env = {"RIVULET_MAX_BATCH": "2", "RIVULET_REQUEST_TIMEOUT_S": "120"}
    with live_server(env, log_dir=tmp_path, extra_args=("--graceful-timeout", str(GRACE_S))) as server:
        short = {"messages": PROMPT, "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
        long = {**short, "max_tokens": 480}
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
            # Every stream open (the short one may already have finished: 40 tokens go fast) before SIGTERM.
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
    # Running generations may finish within the grace time: the short one does.
    assert results[0][-2]["choices"][0]["finish_reason"] == "length"
    endings = [chunks[-2]["error"]["type"] if "error" in chunks[-2] else chunks[-2]["choices"][0]["finish_reason"]
               for chunks in results[1:]]
    assert "shutdown" in endings and set(endings) <= {"shutdown", "length"}
    shutdown_error = next(c[-2]["error"] for c in results[1:] if "error" in c[-2])
    assert shutdown_error["code"] == "shutdown" and shutdown_error["message"]
    assert returncode == 0
    assert "draining" in log
    assert "Worker graceful timeout" not in log  # every stream ended before gunicorn had to cut one

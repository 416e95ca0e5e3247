"""RIVULET_QUANT=int8 in the real server: every product reads int8 weights and the fp32 ones are released
(the log says how much of each), and greedy answers are the same alone and batched. (An unknown value: tests/service/test_settings.py.)"""
from __future__ import annotations

from tests.integration.test_compile import answers
from tests.live_server import live_server


def test_an_int8_server_answers_the_same_alone_and_batched(tmp_path):
    with live_server({"RIVULET_MAX_BATCH": "4", "RIVULET_QUANT": "int8"}, log_dir=tmp_path) as server:
        assert "MiB of int8 weights serve every product" in server.log()
        assert "MiB of fp32 weights released" in server.log()
        answered = answers(server.url)
    assert all(answered) and answered[:2] == answered[2:]


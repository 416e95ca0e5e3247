"""The request log line and the requests metric: route labels stay bounded, yet every line says what was asked."""
from __future__ import annotations

import json
import logging

import pytest


def ask(client, method: str, path: str) -> int:
    """The status; the response is closed, which is when its log line is written."""
    with client.open(path, method=method) as response:
        return response.status_code


def logged(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "rivulet.request"]


def requests_total(client, route: str, status: int) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    wanted = f'rivulet_requests_total{{route="{route}",status="{status}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted)), 0.0)


@pytest.mark.parametrize("method, path, route", [
    ("GET", "/v1/chat/completions", "/v1/chat/completions"),
    ("PUT", "/v1/streams/abc123", "/v1/streams/<stream_id>"),  # the rule: a stream's id never reaches the log
])
def test_a_405_is_logged_and_counted_with_the_route_that_was_asked_for(client, caplog, method, path, route):
    with caplog.at_level(logging.INFO, logger="rivulet.request"):
        assert ask(client, method, path) == 405
    (line,) = logged(caplog)
    assert (line["method"], line["route"], line["status"]) == (method, route, 405)
    assert "path" not in line and "abc123" not in json.dumps(line)
    assert requests_total(client, route, 405) == 1


def test_a_path_no_route_has_is_logged_as_asked_under_one_label(client, caplog):
    with caplog.at_level(logging.INFO, logger="rivulet.request"):
        assert ask(client, "GET", "/no/such/page") == 404
        assert ask(client, "GET", "/x" * 300) == 404
    first, second = logged(caplog)
    assert (first["route"], first["path"], first["status"]) == ("unmatched", "/no/such/page", 404)
    assert len(second["path"]) == 200  # bounded
    assert requests_total(client, "unmatched", 404) == 2


def test_a_matched_route_logs_its_rule_and_no_path(client, caplog):
    with caplog.at_level(logging.INFO, logger="rivulet.request"):
        assert ask(client, "GET", "/health") == 200
    (line,) = logged(caplog)
    assert line["route"] == "/health" and "path" not in line

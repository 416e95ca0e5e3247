"""API keys: where they are read from, constant-time matching, which routes need one."""
from __future__ import annotations

import logging

import pytest
from werkzeug.datastructures import Headers

from service import create_app
from service.auth import presented_token, token_matches

KEYS = ("key-one", "key-two")


@pytest.mark.parametrize("headers, token", [
    ({"X-Auth-Token": "abc"}, "abc"),
    ({"Authorization": "Bearer abc"}, "abc"),
    ({"Authorization": "bearer  abc "}, "abc"),
    ({"Authorization": "Basic abc"}, None),
    ({"Authorization": "Bearer "}, None),
    ({}, None),
])
def test_presented_token(headers, token):
    assert presented_token(Headers(headers)) == token


def test_token_matches_any_configured_key_exactly():
    assert token_matches("key-two", KEYS)
    assert not token_matches("key-tw", KEYS)
    assert not token_matches("key-two ", KEYS)
    assert not token_matches("ключ", KEYS)  # non-ASCII is compared as bytes, not refused


@pytest.fixture
def auth_client(make_settings):
    return create_app(make_settings(api_keys=KEYS)).test_client()


@pytest.mark.parametrize("headers", [{}, {"X-Auth-Token": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_missing_or_wrong_key_is_401_json(auth_client, headers):
    response = auth_client.post("/v1/chat/completions", json={"messages": []}, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["type"] == "authentication_error"
    assert response.headers["X-Request-Id"]


@pytest.mark.parametrize("headers", [{"X-Auth-Token": "key-one"}, {"Authorization": "Bearer key-two"}])
def test_either_header_with_a_valid_key_passes(auth_client, headers):
    # Past auth, the (invalid) body is judged: 400, not 401.
    response = auth_client.post("/v1/chat/completions", json={"messages": []}, headers=headers)
    assert response.status_code == 400


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_and_metrics_are_public(auth_client, path):
    assert auth_client.get(path).status_code in (200, 503)


def test_models_needs_a_key(auth_client):
    assert auth_client.get("/v1/models").status_code == 401
    assert auth_client.get("/v1/models", headers={"X-Auth-Token": "key-one"}).status_code == 200


def test_cors_preflight_needs_no_key(auth_client):
    assert auth_client.options("/v1/chat/completions").status_code == 200


def test_no_keys_means_no_auth(client):
    assert client.get("/v1/models").status_code == 200


def test_tokens_never_reach_the_log(auth_client, caplog):
    with caplog.at_level(logging.DEBUG):
        for token in ("wrong-secret", "key-one"):
            auth_client.post("/v1/chat/completions", json={"messages": []}, headers={"X-Auth-Token": token}).close()
    assert caplog.records  # the request log did write
    assert "wrong-secret" not in caplog.text and "key-one" not in caplog.text

"""The authentication layer in process: tokens (where they are read from, constant-time matching), AK/SK
and app signing (vendor-signed requests through the app), app codes, which routes need a credential,
and what reaches the log and the metrics."""
from __future__ import annotations

import json
import logging
import os

import pytest
from werkzeug.datastructures import Headers

from service import create_app
from service.auth import matching_index, presented_token
from tests.vendor_signer import sdk_date, vendor_sign

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


def test_a_token_matches_a_configured_key_exactly():
    assert matching_index("key-two", KEYS) == 1
    assert matching_index("key-tw", KEYS) is None
    assert matching_index("key-two ", KEYS) is None
    assert matching_index("ключ", KEYS) is None  # non-ASCII is compared as bytes, not refused


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


# --- AK/SK, app signing and app codes, beside tokens ---------------------------------------------------

AK, SK = "AK-TEST-0001", "sk-secret-value-0001"
APP_KEY, APP_SECRET = "app-key-0001", "app-secret-value-0001"
APP_CODE = "app-code-secret-0001"
INVALID_CHAT = json.dumps({"messages": []}).encode()  # past auth the body is judged: 400


@pytest.fixture
def key_files(tmp_path):
    access = tmp_path / "access_keys"
    access.write_text(f"# AK:SK\n{AK}:{SK}\n")
    apps = tmp_path / "app_keys"
    apps.write_text(f"{APP_KEY}:{APP_SECRET}\n")
    for path in (access, apps):
        os.chmod(path, 0o600)
    return access, apps


@pytest.fixture
def every_method_app(make_settings, key_files):
    access, apps = key_files
    return create_app(make_settings(api_keys=KEYS, access_keys=access, app_keys=apps, app_codes=(APP_CODE,),
                                    max_body_bytes=4096))


def send(client, signed, body=None):
    return client.open(signed.target, method=signed.method, headers=signed.headers,
                       data=signed.body if body is None else body)


def sign(ak=AK, sk=SK, method="POST", path="/v1/chat/completions", **kwargs):
    return vendor_sign(ak, sk, method, path, host="localhost", body=kwargs.pop("body", INVALID_CHAT), **kwargs)


def error_code(response) -> str:
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.get_json()["error"]["type"] == "authentication_error"
    return response.get_json()["error"]["code"]


def log_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "rivulet.request"]


@pytest.mark.parametrize("ak, sk, method", [(AK, SK, "aksk"), (APP_KEY, APP_SECRET, "app_signature")])
def test_signed_requests_pass_and_say_who_signed(every_method_app, caplog, ak, sk, method):
    client = every_method_app.test_client()
    with caplog.at_level(logging.INFO, logger="rivulet.request"):
        response = send(client, sign(ak, sk, query=[("trace", "中文")]))
        response.close()
    assert response.status_code == 400  # the signature passed, and the body reached the route whole
    assert "messages" in response.get_json()["error"]["message"]
    (line,) = log_lines(caplog)
    assert (line["auth_method"], line["key_id"], line["auth_outcome"]) == (method, ak, "ok")
    assert sk not in caplog.text


def test_a_signed_get_without_a_body(every_method_app):
    response = send(every_method_app.test_client(), sign(method="GET", path="/v1/models", body=b""))
    assert response.status_code == 200 and response.get_json()["object"] == "list"


def test_one_changed_body_byte_is_refused(every_method_app):
    signed = sign()
    assert error_code(send(every_method_app.test_client(), signed, signed.body.replace(b"[]", b"[ ]"))) \
        == "signature_mismatch"


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_credentials"),
    ({"X-Auth-Token": "wrong"}, "invalid_api_key"),
    ({"X-Apig-AppCode": "wrong"}, "invalid_app_code"),
    ({"Authorization": "SDK-HMAC-SHA256 Access=AK"}, "malformed_authorization"),
    ({"Authorization": "SDK-HMAC-SM3 Access=AK, SignedHeaders=host, Signature=00"}, "unsupported_signature_algorithm"),
])
def test_each_method_says_what_failed(every_method_app, headers, code):
    response = every_method_app.test_client().post("/v1/chat/completions", data=INVALID_CHAT, headers=headers)
    assert error_code(response) == code


def test_missing_credentials_lists_every_configured_method(every_method_app):
    message = every_method_app.test_client().post("/v1/chat/completions").get_json()["error"]["message"]
    for way in ("Bearer", "X-Auth-Token", "SDK-HMAC-SHA256", "X-Apig-AppCode"):
        assert way in message


def test_an_unknown_access_key_is_not_logged(every_method_app, caplog):
    with caplog.at_level(logging.INFO, logger="rivulet.request"):
        response = send(every_method_app.test_client(), sign(ak="AK-NOBODY-KNOWS", sk="whatever-secret"))
        response.close()
    assert error_code(response) == "unknown_access_key"
    (line,) = log_lines(caplog)
    assert (line["auth_method"], line["key_id"], line["auth_outcome"]) == ("signature", None, "unknown_access_key")
    assert "AK-NOBODY-KNOWS" not in caplog.text


def test_a_known_key_with_a_bad_signature_is_logged_with_its_id(every_method_app, caplog):
    with caplog.at_level(logging.INFO, logger="rivulet.request"):
        response = send(every_method_app.test_client(), sign(sk="not-the-secret"))
        response.close()
    assert error_code(response) == "signature_mismatch"
    (line,) = log_lines(caplog)
    assert (line["auth_method"], line["key_id"], line["auth_outcome"]) == ("aksk", AK, "signature_mismatch")


def test_app_codes_and_tokens_work_beside_signatures(every_method_app, caplog):
    client = every_method_app.test_client()
    with caplog.at_level(logging.INFO, logger="rivulet.request"):
        for headers in ({"X-Apig-AppCode": APP_CODE}, {"Authorization": "Bearer key-two"}):
            response = client.post("/v1/chat/completions", data=INVALID_CHAT, headers=headers)
            response.close()
            assert response.status_code == 400
    assert [(line["auth_method"], line["key_id"]) for line in log_lines(caplog)] == [
        ("app_code", "app_code:1"), ("token", "token:2")]
    assert APP_CODE not in caplog.text and "key-two" not in caplog.text


def test_a_stale_signature_is_refused(every_method_app):
    assert error_code(send(every_method_app.test_client(), sign(date=sdk_date(-901)))) == "stale_date"


def test_the_skew_is_configurable(make_settings, key_files):
    app = create_app(make_settings(access_keys=key_files[0], signature_max_skew_s=5))
    assert error_code(send(app.test_client(), sign(date=sdk_date(-30)))) == "stale_date"
    assert send(app.test_client(), sign(date=sdk_date(-2))).status_code == 400


def test_a_signature_when_signing_is_off(auth_client):
    assert error_code(send(auth_client, sign())) == "auth_method_disabled"


def test_a_signed_body_over_the_limit_is_413(every_method_app):
    signed = sign(body=b'{"prompt": "' + b"x" * 5000 + b'"}')
    assert send(every_method_app.test_client(), signed).status_code == 413


@pytest.mark.parametrize("method, path", [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/streams/abc"),
                                          ("DELETE", "/v1/streams/abc"), ("OPTIONS", "/v1/sse")])
def test_public_routes_stay_public(every_method_app, method, path):
    assert every_method_app.test_client().open(path, method=method).status_code != 401


def test_the_metric_counts_methods_and_outcomes_never_key_ids(every_method_app):
    client = every_method_app.test_client()
    send(client, sign()).close()
    send(client, sign(sk="not-the-secret")).close()
    send(client, sign(ak="AK-NOBODY-KNOWS")).close()
    client.post("/v1/chat/completions", headers={"X-Apig-AppCode": APP_CODE}).close()
    client.post("/v1/chat/completions").close()
    metrics = client.get("/metrics").get_data(as_text=True)
    for series in ('{method="aksk",outcome="ok"} 1.0', '{method="aksk",outcome="signature_mismatch"} 1.0',
                   '{method="signature",outcome="unknown_access_key"} 1.0', '{method="app_code",outcome="ok"} 1.0',
                   '{method="none",outcome="missing_credentials"} 1.0'):
        assert "rivulet_auth_requests_total" + series in metrics
    assert AK not in metrics and "AK-NOBODY-KNOWS" not in metrics


def test_a_credential_of_an_unconfigured_method_is_passed_over_for_a_configured_one(make_settings):
    app = create_app(make_settings(app_codes=(APP_CODE,)))
    client = app.test_client()
    both = {"Authorization": "Bearer placeholder-of-an-sdk", "X-Apig-AppCode": APP_CODE}
    assert client.post("/v1/chat/completions", data=INVALID_CHAT, headers=both).status_code == 400
    only_token = {"Authorization": "Bearer placeholder-of-an-sdk"}
    assert error_code(client.post("/v1/chat/completions", data=INVALID_CHAT, headers=only_token)) \
        == "auth_method_disabled"

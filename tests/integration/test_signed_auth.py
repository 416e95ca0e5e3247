"""Every authentication method end to end over real HTTP through gunicorn: requests signed by Huawei Cloud's
own SDK signer are accepted (a Chinese prompt, a query string, a path that needs encoding, chunked bodies)
and refused once any one byte of body, header, date, path or query changes; app signing, app codes and
tokens work beside them; signed POST /v1/streams hands out a stream URL that needs no credential; the log
and the metrics name the method and key id and never a secret; the README's signing example runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import requests

from tests.integration.test_readme_examples import code_blocks, readme_section
from tests.live_server import LiveServer, live_server
from tests.vendor_signer import Signed, sdk_date, vendor_sign

AK, SK = "HPUAEXAMPLEAK0001", "sk-live-0123456789abcdefghij"
APP_KEY, APP_SECRET = "app-key-live-0001", "app-secret-live-0123456789"
APP_CODE = "app-code-live-0123456789"
TOKEN = "token-live-0123456789"
MAX_BODY = 65536
PROMPT = {"messages": [{"role": "user", "content": "你是谁?"}], "max_tokens": 4, "temperature": 0,
          "ignore_eos": True, "stream": False}
ENCODED_PATH = "/v1/streams/%E6%B5%81%20a%2Bb/drop-readers"  # stream id "流 a+b": a test-hook route


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> LiveServer:
    folder = tmp_path_factory.mktemp("signed-auth")
    access, apps = folder / "access_keys", folder / "app_keys"
    access.write_text(f"# AK:SK pairs\n{AK}:{SK}\n")
    apps.write_text(f"{APP_KEY}:{APP_SECRET}\n")
    for path in (access, apps):
        os.chmod(path, 0o600)
    env = {"RIVULET_ACCESS_KEYS": str(access), "RIVULET_APP_KEYS": str(apps), "RIVULET_APP_CODES": APP_CODE,
           "RIVULET_API_KEYS": TOKEN, "RIVULET_TEST_HOOKS": "true", "RIVULET_DEVICE": "cpu",
           "RIVULET_MAX_BODY_BYTES": str(MAX_BODY)}
    with live_server(env, log_dir=folder) as srv:
        yield srv


def host_of(server: LiveServer) -> str:
    return urlsplit(server.url).netloc


def signed_sse(server: LiveServer, ak: str = AK, sk: str = SK, **kwargs) -> Signed:
    body = kwargs.pop("body", json.dumps(PROMPT, ensure_ascii=False).encode())
    query = kwargs.pop("query", [("trace", "中文 trace"), ("b", "1")])
    return vendor_sign(ak, sk, "POST", "/v1/sse", host=host_of(server), body=body, query=query, **kwargs)


def events(response: requests.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]


def assert_streamed(response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    data = events(response)
    assert data[-1] == "[DONE]" and all("error" not in json.loads(d) for d in data[:-1])


def refused(response: requests.Response) -> str:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    return error["code"]


def test_the_vendor_signed_sse_request_streams(server):
    signed = signed_sse(server)
    assert signed.target == "/v1/sse?b=1&trace=%E4%B8%AD%E6%96%87%20trace"
    assert_streamed(signed.send(server.url, stream=True, timeout=60))


def test_a_path_that_needs_encoding_is_routed(server):
    signed = vendor_sign(AK, SK, "POST", ENCODED_PATH, host=host_of(server), query=[("why", "路径")])
    response = signed.send(server.url, timeout=30)
    assert response.status_code == 200 and response.json() == {"dropped": 0}


def _flip_byte(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def _header(name: str, change: Callable[[str], str]) -> Callable[[Signed], Signed]:
    def mutate(signed: Signed) -> Signed:
        return Signed(signed.method, signed.target, {**signed.headers, name: change(signed.headers[name])},
                      signed.body)
    return mutate


def _body(change: Callable[[bytes], bytes]) -> Callable[[Signed], Signed]:
    return lambda signed: Signed(signed.method, signed.target, signed.headers, change(signed.body))


def _target(change: Callable[[str], str]) -> Callable[[Signed], Signed]:
    return lambda signed: Signed(signed.method, change(signed.target), signed.headers, signed.body)


def _next_second(date: str) -> str:
    return date[:-3] + f"{(int(date[-3:-1]) + 1) % 60:02d}Z"


# One byte changed anywhere: always refused, always as a mismatch of the signature.
ONE_BYTE = {
    "body: a byte inside 你": _body(lambda b: _flip_byte(b, b.index("你".encode()) + 1)),
    "body: a byte of max_tokens": _body(lambda b: b.replace(b": 4", b": 5")),
    "header: X-Client": _header("X-Client", lambda v: v[:-1] + "Y"),
    "header: Content-Type": _header("Content-Type", lambda v: v.replace("json", "jsoN")),
    "date: one second later": _header("X-Sdk-Date", _next_second),
    "path: one byte": _target(lambda t: t.replace("/v1/sse", "/v1/ssE")),
    "query: one byte": _target(lambda t: t.replace("b=1", "b=2")),
    "signature: one hex digit": _header("Authorization", lambda v: v[:-1] + ("1" if v[-1] == "0" else "0")),
}


@pytest.mark.parametrize("mutate", ONE_BYTE.values(), ids=ONE_BYTE.keys())
def test_one_changed_byte_is_refused(server, mutate):
    signed = signed_sse(server, headers={"X-Client": "客户端 X"})
    broken = mutate(signed)
    assert broken != signed
    assert refused(broken.send(server.url, timeout=30)) == "signature_mismatch"
    assert_streamed(signed.send(server.url, stream=True, timeout=60))  # the unbroken one still passes


def test_the_encoded_path_changed_by_one_byte_is_refused(server):
    signed = vendor_sign(AK, SK, "POST", ENCODED_PATH, host=host_of(server))
    broken = Signed(signed.method, signed.target.replace("%2B", "%2C"), signed.headers, signed.body)
    assert refused(broken.send(server.url, timeout=30)) == "signature_mismatch"


@pytest.mark.parametrize("case, make, code", [
    ("stale date", lambda s: signed_sse(s, date=sdk_date(-901)), "stale_date"),
    ("date from the future", lambda s: signed_sse(s, date=sdk_date(+901)), "stale_date"),
    ("unknown AK", lambda s: signed_sse(s, ak="AK-NOBODY-KNOWS"), "unknown_access_key"),
    ("wrong SK", lambda s: signed_sse(s, sk=SK + "x"), "signature_mismatch"),
    ("unsigned payload", lambda s: signed_sse(s, headers={"Content-Type": "text/plain"}), "unsigned_payload_refused"),
    ("no date", lambda s: _without(signed_sse(s), "X-Sdk-Date"), "missing_date"),
    ("a signed header dropped", lambda s: _without(signed_sse(s, headers={"X-Client": "c"}), "X-Client"),
     "missing_signed_header"),
])
def test_rejections_over_http(server, case, make, code):
    assert refused(make(server).send(server.url, timeout=30)) == code


def _without(signed: Signed, name: str) -> Signed:
    return Signed(signed.method, signed.target, {k: v for k, v in signed.headers.items() if k != name}, signed.body)


def test_a_chunked_signed_body_is_hashed_as_received(server):
    signed = signed_sse(server)
    chunks = iter([signed.body[:7], signed.body[7:]])  # requests sends a generator chunked
    response = requests.post(server.url + signed.target, headers=signed.headers, data=chunks, stream=True, timeout=60)
    assert_streamed(response)


def test_a_chunked_signed_body_over_the_limit_is_413(server):
    body = json.dumps({**PROMPT, "pad": "x" * MAX_BODY}).encode()
    signed = signed_sse(server, body=body)
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
    response = requests.post(server.url + signed.target, headers=signed.headers, data=chunks, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_app_signing_app_codes_and_tokens(server):
    assert_streamed(signed_sse(server, APP_KEY, APP_SECRET).send(server.url, stream=True, timeout=60))
    for headers in ({"X-Apig-AppCode": APP_CODE}, {"X-Auth-Token": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}):
        response = requests.post(server.url + "/v1/sse", json=PROMPT, headers=headers, stream=True, timeout=60)
        assert_streamed(response)
    assert refused(requests.post(server.url + "/v1/sse", json=PROMPT, timeout=30,
                                 headers={"X-Apig-AppCode": "wrong"})) == "invalid_app_code"


def test_a_signed_stream_post_gives_a_capability_url(server):
    body = json.dumps({**PROMPT, "kind": "chat"}).encode()
    signed = vendor_sign(AK, SK, "POST", "/v1/streams", host=host_of(server), body=body)
    created = signed.send(server.url, timeout=30)
    assert created.status_code == 201, created.text
    url = created.json()["url"]
    with requests.get(server.url + url, stream=True, timeout=60) as stream:  # no credential: the id is one
        assert stream.status_code == 200
        assert events(stream)[-1] == "[DONE]"
    assert refused(requests.post(server.url + "/v1/streams", data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})) == "missing_credentials"


def test_the_log_names_method_and_key_never_a_secret(server):
    marker = "signed-log-check"
    signed = signed_sse(server, headers={"X-Request-Id": marker})
    assert_streamed(signed.send(server.url, stream=True, timeout=60))
    refused(signed_sse(server, sk="a-guessed-secret", headers={"X-Request-Id": marker + "-bad"})
            .send(server.url, timeout=30))
    deadline = time.monotonic() + 10
    while f'"{marker}-bad"' not in (log := server.log()):
        assert time.monotonic() < deadline, "no request log line"
        time.sleep(0.05)
    lines = {entry["request_id"]: entry for entry in _request_lines(log)}
    assert (lines[marker]["auth_method"], lines[marker]["key_id"], lines[marker]["auth_outcome"]) == ("aksk", AK, "ok")
    assert lines[marker + "-bad"]["auth_outcome"] == "signature_mismatch"
    for secret in (SK, APP_SECRET, APP_CODE, TOKEN, "a-guessed-secret", signed.headers["Authorization"][-64:]):
        assert secret not in log
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert 'rivulet_auth_requests_total{method="aksk",outcome="ok"}' in metrics
    assert AK not in metrics


def _request_lines(log: str) -> list[dict]:
    found = []
    for line in log.splitlines():
        start = line.find('{"event":"request"')
        if start >= 0:
            found.append(json.loads(line[start:]))
    return found


def test_the_readme_signing_example_works(server):
    (source,) = code_blocks(readme_section("AK/SK signed requests"), "python")
    source = source.replace("localhost:8080", host_of(server)).replace('"your-ak"', repr(AK))
    result = subprocess.run([sys.executable, "-c", source.replace('"your-sk"', repr(SK))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[DONE]" and '"chat.completion.chunk"' in result.stdout


def test_a_key_file_others_can_read_stops_start_up(tmp_path):
    keys = tmp_path / "access_keys"
    keys.write_text(f"{AK}:{SK}\n")
    os.chmod(keys, 0o644)
    with pytest.raises(RuntimeError) as raised:
        with live_server({"RIVULET_ACCESS_KEYS": str(keys), "RIVULET_DEVICE": "cpu"}, log_dir=tmp_path,
                         ready_timeout=60):
            pass
    assert f"RIVULET_ACCESS_KEYS ({keys}): the key file has mode 0644" in str(raised.value)
    assert SK not in str(raised.value)


def test_a_key_added_to_the_file_works_without_a_restart(server):
    access = server.log_path.parent / "access_keys"
    new_ak, new_sk = "HPUAEXAMPLEAK0002", "sk-live-added-while-running"

    def signed() -> Signed:
        return vendor_sign(new_ak, new_sk, "GET", "/v1/models", host=host_of(server))

    assert refused(signed().send(server.url, timeout=10)) == "unknown_access_key"
    replacement = access.with_name("access_keys.new")
    replacement.write_text(access.read_text() + f"{new_ak}:{new_sk}\n")
    os.chmod(replacement, 0o600)
    os.replace(replacement, access)  # swapped whole, as a Kubernetes Secret update does
    deadline = time.monotonic() + 10
    while (response := signed().send(server.url, timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.2)
    assert response.json()["object"] == "list"
    assert signed_sse(server).send(server.url, timeout=60).status_code == 200  # the first pair still works


"""The Postman collection: it covers every route, authenticates through its collection variable, and
newman (Postman's runner, from the npm registry) passes it against the live server with auth on."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from tests.conftest import missing_tool
from tests.integration.conftest import ACCESS_KEY, API_KEY, SECRET_KEY

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = ROOT / "postman" / "rivulet.postman_collection.json"
ENVIRONMENT = ROOT / "postman" / "rivulet.postman_environment.json"
# .ci/run installs newman here; a developer's first run installs it the same way.
NEWMAN_DIR = Path(os.environ.get("RIVULET_NEWMAN_DIR", Path.home() / ".cache" / "rivulet-newman"))
NEWMAN = NEWMAN_DIR / "node_modules" / ".bin" / "newman"
# Routes a user has no business calling: the test hook, and Flask's static folder (the page's own files
# are served by routes of their own).
NOT_FOR_USERS = {"streams.drop_readers", "test_hooks.engine_fault", "static"}


def requests_of(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        if "item" in item:
            yield from requests_of(item["item"])
        else:
            yield item


@pytest.fixture(scope="module")
def collection() -> dict[str, Any]:
    return json.loads(COLLECTION.read_text())


def test_the_collection_covers_every_route(collection, app):
    adapter = app.url_map.bind("localhost")
    covered = set()
    for item in requests_of(collection["item"]):
        request = item["request"]
        path = "/" + "/".join(request["url"]["path"])
        path = path.replace("{{streamId}}", "an-id").replace("{{cancelStreamId}}", "an-id")
        try:
            endpoint, _ = adapter.match(path, method=request["method"])
        except (NotFound, MethodNotAllowed):
            pytest.fail(f"{item['name']}: {request['method']} {path} is no route of the app")
        covered.add(endpoint)
        assert item["response"], f"{item['name']}: no example response"
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()} - NOT_FOR_USERS
    assert endpoints - covered == set()


def test_auth_is_the_collection_variable_sent_as_x_auth_token(collection):
    assert collection["info"]["schema"].endswith("/collection/v2.1.0/collection.json")
    auth = {entry["key"]: entry["value"] for entry in collection["auth"]["apikey"]}
    assert collection["auth"]["type"] == "apikey"
    assert auth == {"key": "X-Auth-Token", "value": "{{apiKey}}", "in": "header"}
    variables = {v["key"]: v["value"] for v in collection["variable"]}
    assert variables["apiKey"] == "" and variables["baseUrl"].startswith("http")
    environment = {v["key"]: v for v in json.loads(ENVIRONMENT.read_text())["values"]}
    assert set(environment) == {"baseUrl", "apiKey", "accessKey", "secretKey"}
    for credential in ("apiKey", "accessKey", "secretKey"):
        assert environment[credential]["value"] == "" and environment[credential]["type"] == "secret"
    # No request carries a key of its own, in a header or in a saved example.
    for secret in (API_KEY, ACCESS_KEY, SECRET_KEY):
        assert secret not in COLLECTION.read_text()
    for item in requests_of(collection["item"]):
        assert all(h["key"].lower() not in ("x-auth-token", "authorization") for h in item["request"]["header"])


def test_every_request_tests_status_and_streams_test_content_type_and_done(collection):
    for item in requests_of(collection["item"]):
        tests = "\n".join(line for event in item["event"] if event["listen"] == "test"
                          for line in event["script"]["exec"])
        assert "pm.response.to.have.status" in tests, item["name"]
        example = item["response"][0]
        if any(h["value"].startswith("text/event-stream") for h in example["header"]
               if h["key"] == "Content-Type") and example["code"] == 200:
            assert "text/event-stream" in tests and "[DONE]" in tests, item["name"]


@pytest.fixture(scope="module")
def newman() -> Path:
    if NEWMAN.exists():
        return NEWMAN
    npm = shutil.which("npm")
    if npm is None:
        missing_tool("npm is not installed (apt-get install npm; .ci/run does it)")
    NEWMAN_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "newman"], cwd=NEWMAN_DIR,
                   check=True, capture_output=True, timeout=600)
    return NEWMAN


def test_the_pre_request_script_signs_with_the_environments_ak_sk(collection):
    (event,) = collection["event"]
    assert event["listen"] == "prerequest"
    script = "\n".join(event["script"]["exec"])
    for needed in ('pm.variables.get("accessKey")', 'pm.variables.get("secretKey")', "SDK-HMAC-SHA256",
                   "X-Sdk-Date", "CryptoJS.HmacSHA256", '"noauth"'):
        assert needed in script


# Each credential alone: the API key through the collection's auth, or AK/SK through the pre-request script.
CREDENTIALS = {"api-key": {"apiKey": API_KEY}, "ak-sk": {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}}


@pytest.mark.newman
@pytest.mark.parametrize("credentials", CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_newman_passes_against_the_live_server(newman, streams_server, tmp_path, credentials):
    report = tmp_path / "newman.json"
    env_vars = [arg for name, value in credentials.items() for arg in ("--env-var", f"{name}={value}")]
    result = subprocess.run(
        [str(newman), "run", str(COLLECTION), "--environment", str(ENVIRONMENT),
         "--env-var", f"baseUrl={streams_server.url}", *env_vars,
         "--reporters", "cli,json", "--reporter-json-export", str(report), "--color", "off",
         "--timeout-request", "60000"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    run = json.loads(report.read_text())["run"]
    assert run["failures"] == []
    stats = run["stats"]
    expected_requests = sum(1 for _ in requests_of(json.loads(COLLECTION.read_text())["item"]))
    assert stats["requests"]["total"] == expected_requests and stats["requests"]["failed"] == 0
    assert stats["assertions"]["failed"] == 0 and stats["assertions"]["total"] >= 3 * expected_requests
    assert not any(a.get("skipped") for e in run["executions"] for a in e.get("assertions", [])), \
        "auth is on: no test may be skipped"

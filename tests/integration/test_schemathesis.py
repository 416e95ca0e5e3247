"""schemathesis against the live demo server, over every operation of GET /openapi.json: generated and
hostile inputs never get a 5xx, and every answer (status, content type, body) is what the document says.

schemathesis's own pytest plugin (``from_fixture``) does not run under pytest 9, so the operations are
walked here: for each one, a few examples that fit the document and a few that do not. Twice: against
the demo LLM, and against a model package (whose routes take its own INPUT_SCHEMA)."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)

from tests.live_server import live_server

INFERLESS = Path(__file__).resolve().parent.parent / "fixtures" / "inferless_package"

# Generation bodies get a tiny max_tokens so each example's answer (a stream, often) ends at once.
MAX_TOKENS = 3
EXAMPLES_PER_OPERATION = 6
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def bound_generation(case) -> None:
    """Keep an LLM's generated requests quick to answer: few tokens. Only valid counts are lowered, so a
    body meant to be invalid stays invalid."""
    if not isinstance(case.body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            case.body[field] = MAX_TOKENS
    if "max_tokens" not in case.body:
        case.body["max_tokens"] = MAX_TOKENS


def failures_of(operation, mode: GenerationMode, llm: bool) -> str | None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        if llm:  # a package's inputs are its own: left as generated
            bound_generation(case)
        case.call_and_validate(checks=CHECKS, timeout=60)

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, operation.label
        return None  # no input of this operation can be invalid (no parameters, or any string fits)
    except Exception as exc:  # noqa: BLE001 - every operation is tried; the report lists them all
        return f"{operation.label} ({mode.value}):\n{exc}"
    return None


@pytest.fixture(scope="module")
def package_server(tmp_path_factory):
    env = {"RIVULET_MODEL": str(INFERLESS), "RIVULET_HEARTBEAT_S": "1"}
    with live_server(env, log_dir=tmp_path_factory.mktemp("package-server")) as server:
        yield server


@pytest.mark.parametrize("server", ["demo_server", "package_server"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_conforms_and_never_fails(request, server, mode):
    llm = server == "demo_server"
    server = request.getfixturevalue(server)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = requests.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    labels = {f"{method.upper()} {path}" for path, item in documented.items() for method in item}
    # schemathesis leaves out the operation that serves the document it was loaded from.
    assert {operation.label for operation in operations} == labels - {"GET /openapi.json"}
    failures = [failure for operation in operations if (failure := failures_of(operation, mode, llm))]
    assert not failures, "\n\n".join(failures)

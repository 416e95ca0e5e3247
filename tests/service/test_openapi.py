"""GET /openapi.json: generated from the request models and the served package's INPUT_SCHEMA, every route."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from models.errors import InvalidRequest
from service.openai_schemas import ChatRequest, CompletionRequest

INFERLESS = Path(__file__).resolve().parent.parent / "fixtures" / "inferless_package"


def document_of(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return response.get_json()


def flask_paths(app) -> set[tuple[str, str]]:
    from service.openapi import _openapi_path

    return {(_openapi_path(rule.rule), method.lower()) for rule in app.url_map.iter_rules()
            if rule.endpoint not in ("static", "streams.drop_readers")
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_every_route_and_method_is_documented(app, client):
    document = document_of(client)
    assert document["openapi"].startswith("3.1")
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == flask_paths(app)
    assert len({op["operationId"] for item in document["paths"].values() for op in item.values()}) == len(documented)


def test_request_bodies_are_the_pydantic_models(client):
    document = document_of(client)
    schemas = document["components"]["schemas"]
    assert schemas["ChatRequest"]["properties"].keys() == ChatRequest.model_json_schema()["properties"].keys()
    assert schemas["CompletionRequest"]["properties"].keys() == CompletionRequest.model_json_schema()["properties"].keys()
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    # The LLM's /v1/sse takes either body.
    sse = document["paths"]["/v1/sse"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert sse == {"anyOf": [{"$ref": "#/components/schemas/ChatRequest"},
                             {"$ref": "#/components/schemas/CompletionRequest"}]}
    assert list(document["paths"]["/v1/sse"]["post"]["responses"]["200"]["content"]) == ["text/event-stream"]


def test_errors_share_the_one_error_shape(client):
    document = document_of(client)
    for path, item in document["paths"].items():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path != "/ready":  # /ready's 503 is its own status object
                    assert response == {"$ref": f"#/components/responses/{status}"}
    error = document["components"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert document["components"]["schemas"]["ErrorDetail"]["required"] == ["message", "type", "code", "param"]


def test_security_only_with_keys_and_never_on_public_routes(make_settings):
    from service import create_app

    open_doc = document_of(create_app(make_settings()).test_client())
    assert "security" not in open_doc and "securitySchemes" not in open_doc["components"]
    keyed = create_app(make_settings(api_keys=("k",))).test_client()
    document = document_of(keyed)  # /openapi.json itself is public
    assert document["security"] == [{"bearer": []}, {"authToken": []}]
    assert document["paths"]["/health"]["get"]["security"] == []
    assert document["paths"]["/v1/streams/{stream_id}"]["get"]["security"] == []
    assert "security" not in document["paths"]["/v1/chat/completions"]["post"]
    assert "401" in document["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_the_test_hook_route_is_documented_only_when_on(make_settings):
    from service import create_app

    assert "/v1/streams/{stream_id}/drop-readers" not in document_of(create_app(make_settings()).test_client())["paths"]
    hooked = document_of(create_app(make_settings(test_hooks=True)).test_client())
    assert "post" in hooked["paths"]["/v1/streams/{stream_id}/drop-readers"]


# --- a model package's document -------------------------------------------------------------------

@pytest.fixture(scope="module")
def package_app():
    from service import create_app
    from service.settings import Settings

    return create_app(Settings.from_env({}, model=INFERLESS))


@pytest.mark.parametrize("body", [
    {"prompt": "a house"},
    {"prompt": "a house", "max_words": 3, "upper": True},
    {"prompt": {"structured": ["input"]}},
    {"inputs": {"prompt": "a house", "upper": False}},
    {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a house"]},
                {"name": "max_words", "datatype": "INT64", "data": [2]}], "id": "42"},
])
def test_package_bodies_the_package_takes_match_the_document(package_app, body):
    schema = package_body_schema(package_app)
    jsonschema.validate(body, schema)
    package_app.extensions["rivulet"].model.parse_package_inputs(body)  # and the package agrees


@pytest.mark.parametrize("body", [
    {},  # prompt is required
    {"prompt": 3},
    {"prompt": "x", "max_words": "4"},
    {"prompt": "x", "max_words": 2**63},
    {"prompt": "x", "upper": 1},
    {"prompt": "x", "colour": "red"},
    {"inputs": [{"name": "prompt", "data": ["a", "b"]}]},
    {"inputs": [{"name": "prompt", "datatype": "INT64", "data": ["a"]}]},
    {"inputs": [{"name": "nope", "data": ["a"]}]},
    {"inputs": []},  # prompt is required in a KServe list too
    {"inputs": [{"name": "prompt", "data": ["a"]}, {"name": "prompt", "data": ["b"]}]},  # given twice
])
def test_package_bodies_the_package_refuses_do_not_match_the_document(package_app, body):
    schema = package_body_schema(package_app)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, schema)
    with pytest.raises(InvalidRequest):
        package_app.extensions["rivulet"].model.parse_package_inputs(body)


def package_body_schema(app) -> dict:
    document = document_of(app.test_client())
    schema = document["paths"]["/v1/sse"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert document["paths"]["/v1/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"] == schema
    assert schema["anyOf"][0]["properties"]["prompt"]["examples"] == ["There is a fine house in the forest"]
    return schema


def test_the_documents_are_valid_openapi_3_1(make_settings, package_app):
    from schemathesis.specs.openapi.definitions import OPENAPI_31  # the OpenAPI Initiative's meta-schema

    from service import create_app

    for app in (create_app(make_settings()), create_app(make_settings(api_keys=("k",), test_hooks=True)),
                package_app):
        jsonschema.Draft202012Validator(OPENAPI_31).validate(document_of(app.test_client()))

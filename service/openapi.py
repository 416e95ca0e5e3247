"""The OpenAPI 3.1 document of the running app, served at ``GET /openapi.json``.

Nothing here is written twice: request bodies are the JSON schemas of the pydantic models the routes
validate with (``service/openai_schemas.py``); a model package's routes describe that package's own
``INPUT_SCHEMA``; the paths are the app's own routes (a test checks that none is left out), and which
need a key comes from their ``@public`` mark. Responses use the one error shape of
``service/errors.py``; streaming answers are ``text/event-stream``.

The document describes the app it is asked from: an LLM's body routes take chat/completion bodies, a
package's take its inputs; security appears only when RIVULET_API_KEYS is set.
"""
from __future__ import annotations

from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from models.serving import INT64_MAX, INT64_MIN, KSERVE_ENVELOPE_KEYS, WIRE_DATATYPES, InputSchema
from service.auth import is_public
from service.openai_schemas import ChatRequest, CompletionRequest
from service.openapi_responses import (
    ChatCompletion, Completion, DroppedReaders, ErrorBody, Health, ModelList, Readiness, StreamCreated,
)
from service.routes_streams import KINDS

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
JSON, EVENT_STREAM = "application/json", "text/event-stream"


def served_input_schema(app: Flask) -> InputSchema | None:
    """The served model package's INPUT_SCHEMA, or None when an LLM is served. The one place that asks
    the runtime which model it serves."""
    return app.extensions["rivulet"].model.input_schema  # None for an LLM


_MODELS: tuple[type[BaseModel], ...] = (
    ChatRequest, CompletionRequest, ErrorBody, ChatCompletion, Completion, ModelList, Health, Readiness,
    StreamCreated, DroppedReaders,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


# --- a package's inputs -------------------------------------------------------------------------

def _value_schema(datatype: str) -> dict[str, Any]:
    if datatype == "INT":
        return {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}
    if datatype == "BOOLEAN":
        return {"type": "boolean"}
    # A STRING input also takes an object or array, which the package receives as its JSON text.
    return {"type": ["string", "object", "array"]}


def package_inputs_schema(schema: InputSchema) -> dict[str, Any]:
    """The three request shapes a package accepts (models/package_schema.py), as one JSON schema."""
    properties = {}
    for name, spec in schema.fields.items():
        properties[name] = _value_schema(spec.datatype)
        if spec.example is not None:
            properties[name]["examples"] = spec.example
    required = [name for name, spec in schema.fields.items() if spec.required]
    plain = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    envelope = {key: {} for key in sorted(KSERVE_ENVELOPE_KEYS)}
    kserve_items = [{
        "type": "object",
        "properties": {
            "name": {"const": name},
            "shape": {"const": [1]},
            "datatype": {"enum": sorted(WIRE_DATATYPES[spec.datatype])},
            "data": {"type": "array", "items": _value_schema(spec.datatype), "minItems": 1, "maxItems": 1},
            "parameters": {},
        },
        "required": ["name", "data"],
        "additionalProperties": False,
    } for name, spec in schema.fields.items()]
    # Each input at most once, the required ones exactly once.
    once_each = [{"contains": {"type": "object", "properties": {"name": {"const": name}}, "required": ["name"]},
                  "minContains": 1 if spec.required else 0, "maxContains": 1}
                 for name, spec in schema.fields.items()]
    kserve_list = {"type": "array", "items": {"anyOf": kserve_items} if kserve_items else False}
    if once_each:
        kserve_list["allOf"] = once_each
    kserve = {
        "type": "object",
        "properties": {"inputs": kserve_list, **envelope},
        "required": ["inputs"],
        "additionalProperties": False,
    }
    wrapped = {"type": "object", "properties": {"inputs": plain, **envelope}, "required": ["inputs"],
               "additionalProperties": False}
    return {
        "title": "PackageInputs",
        "description": "The served package's INPUT_SCHEMA: a plain object of inputs, the same wrapped in "
                       "'inputs', or a KServe v2 'inputs' list.",
        "anyOf": [plain, wrapped, kserve],
    }


# --- responses ----------------------------------------------------------------------------------

_ERRORS = {
    400: "Invalid request: the body is not valid JSON (code invalid_json) or not a valid request "
         "(the field is named in param).",
    401: "A valid API key is required (when RIVULET_API_KEYS is set).",
    404: "No such route or resource.",
    405: "The route does not take this method.",
    408: "The request body did not arrive within RIVULET_BODY_TIMEOUT_S.",
    413: "The request body is larger than RIVULET_MAX_BODY_BYTES.",
    429: "The waiting queue is full (RIVULET_MAX_WAITING); retry after Retry-After seconds.",
    500: "The model failed while serving this request.",
    503: "The model is not loaded yet, the engine is down, or the worker is shutting down.",
    504: "The answer was not ready within RIVULET_REQUEST_TIMEOUT_S.",
}
_BODY_ERRORS = (400, 408, 413, 429, 500, 503, 504)

_EVENT_STREAM_DESCRIPTION = (
    "Server-Sent Events: 'retry:' first, an 'id:' on every event, ': ping' comments while quiet. Each "
    "'data:' is one JSON object (an OpenAI chunk, or the package's output); a failure after the start is "
    "'data: {\"error\": {...}}'; the last event is 'data: [DONE]'.")


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/{status}"} for status in statuses}


# One event of a stream (OpenAPI 3.1 has no itemSchema yet; tools such as schemathesis read a
# text/event-stream schema as each event's, as OpenAPI 3.2's itemSchema says).
_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string", "description": "A JSON object, or [DONE] (the last event).",
                 "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string", "enum": ["message", "done"]},
        "retry": {"type": "integer", "minimum": 0},
    },
    "required": ["data"],
}


def _stream_content() -> dict[str, Any]:
    return {EVENT_STREAM: {"schema": _EVENT}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": _json(schema)}


# --- paths ------------------------------------------------------------------------------------

def _paths(inputs: dict[str, Any] | None, test_hooks: bool) -> dict[str, dict[str, Any]]:
    """Every route, keyed by Flask endpoint, with the path it is served at."""
    llm_body = {"anyOf": [_ref(ChatRequest), _ref(CompletionRequest)]}
    model_body = inputs if inputs is not None else llm_body
    openai_answer = {
        "200": {"description": "'stream': false: the whole answer. 'stream': true: " + _EVENT_STREAM_DESCRIPTION,
                "content": {**_json(_ref(ChatCompletion)), **_stream_content()}},
    }
    paths: dict[str, dict[str, Any]] = {
        "openai.chat_completions": {"post": {
            "summary": "OpenAI chat completion (streamed when 'stream' is true)",
            "requestBody": _body(_ref(ChatRequest)),
            "responses": {**openai_answer, **_errors(*_BODY_ERRORS)},
        }},
        "openai.completions": {"post": {
            "summary": "OpenAI text completion (streamed when 'stream' is true)",
            "requestBody": _body(_ref(CompletionRequest)),
            "responses": {"200": {"description": openai_answer["200"]["description"],
                                  "content": {**_json(_ref(Completion)), **_stream_content()}},
                          **_errors(*_BODY_ERRORS)},
        }},
        "openai.sse_stream": {"post": {
            "summary": "Always an event stream: the served model's own request (a chat or completion body "
                       "for an LLM, the package's inputs for a model package)",
            "requestBody": _body(model_body),
            "responses": {"200": {"description": _EVENT_STREAM_DESCRIPTION, "content": _stream_content()},
                          **_errors(*_BODY_ERRORS)},
        }},
        "package.infer": {"post": {
            "summary": "A non-streaming model package's answer as one JSON object (400 for an LLM or a "
                       "streaming package)",
            "requestBody": _body(inputs if inputs is not None else {"type": "object"}),
            "responses": {"200": {"description": "The package's output.", "content": _json({"type": "object"})},
                          **_errors(*_BODY_ERRORS)},
        }},
        "openai.models": {"get": {
            "summary": "The served model",
            "responses": {"200": {"description": "One model.", "content": _json(_ref(ModelList))}},
        }},
        "streams.create_stream": {"post": {
            "summary": "Start a resumable stream for EventSource: the body of /v1/chat/completions, "
                       "/v1/completions or /v1/sse; 'kind' (query or body field) says which, else it is "
                       "guessed as /v1/sse does",
            "parameters": [{"name": "kind", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["package"] if inputs is not None else
                                       [kind for kind in KINDS if kind != "package"]}}],
            "requestBody": _body(model_body),
            "responses": {"201": {"description": "Started; GET the url to read it.",
                                  "headers": {"Location": {"schema": {"type": "string"}}},
                                  "content": _json(_ref(StreamCreated))},
                          **_errors(400, 408, 413, 429, 503)},
        }},
        "streams.read_stream": {"get": {
            "summary": "Read a resumable stream from after Last-Event-ID (no key: the id is the capability)",
            "parameters": [
                _stream_id(),
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
                {"name": "lastEventId", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
            ],
            "responses": {
                "200": {"description": _EVENT_STREAM_DESCRIPTION + " Here the last event is 'event: done'.",
                        "content": _stream_content()},
                "204": {"description": "Every event was seen: EventSource stops reconnecting."},
                **_errors(400, 404),
            },
        }},
        "streams.delete_stream": {"delete": {
            "summary": "Cancel a resumable stream's work and forget it",
            "parameters": [_stream_id()],
            "responses": {"204": {"description": "Cancelled."}, **_errors(404)},
        }},
        "health.health": {"get": {
            "summary": "The process is up (the model may still be loading)",
            "responses": {"200": {"description": "Up.", "content": _json(_ref(Health))}},
        }},
        "health.ready": {"get": {
            "summary": "The model is loaded and the engine runs",
            "responses": {"200": {"description": "Ready.", "content": _json(_ref(Readiness))},
                          "503": {"description": "Loading, draining or dead.", "content": _json(_ref(Readiness))}},
        }},
        "health.metrics": {"get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "Prometheus text format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "demo.demo_page": {"get": {
            "summary": "The demo page",
            "responses": {"200": {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}}},
        }},
        "demo.demo_file": {"get": {
            "summary": "The demo page's files",
            "parameters": [{"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The file.", "content": {"*/*": {"schema": {}}}}, **_errors(404)},
        }},
        "docs.openapi": {"get": {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1.", "content": _json({"type": "object"})}},
        }},
    }
    if test_hooks:
        paths["streams.drop_readers"] = {"post": {
            "summary": "Test hook (RIVULET_TEST_HOOKS): end a stream's open readers as a network drop would",
            "parameters": [_stream_id()],
            "responses": {"200": {"description": "How many readers were dropped.",
                                  "content": _json(_ref(DroppedReaders))}},
        }}
        paths["test_hooks.engine_fault"] = {"post": {
            "summary": "Test hook (RIVULET_TEST_HOOKS): fail the engine's next step as a broken device would",
            "responses": {"200": {"description": "The fault is armed.", "content": _json({"type": "object"})}},
        }}
    return paths


def _stream_id() -> dict[str, Any]:
    return {"name": "stream_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _openapi_path(rule: str) -> str:
    """Flask's ``/v1/streams/<stream_id>`` and ``/demo/<path:filename>`` -> ``/v1/streams/{stream_id}``."""
    out, rest = [], rule
    while "<" in rest:
        before, _, tail = rest.partition("<")
        variable, _, rest = tail.partition(">")
        out.append(before + "{" + variable.rpartition(":")[2] + "}")
    return "".join(out) + rest


def build_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``. Routes are looked up by endpoint, so a path is written once
    (in its blueprint); a route without a description here raises, and a test runs this."""
    settings = app.extensions["rivulet"].settings
    input_schema = served_input_schema(app)
    inputs = package_inputs_schema(input_schema) if input_schema is not None else None
    described = _paths(inputs, settings.test_hooks)

    _, top = models_json_schema([(model, "validation") for model in _MODELS], ref_template=REF)
    schemas = top["$defs"]

    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        if rule.endpoint == "streams.drop_readers" and not settings.test_hooks:
            continue  # answers 404 unless the test hooks are on
        operations = described.get(rule.endpoint)
        if operations is None:
            raise LookupError(f"route {rule.rule} ({rule.endpoint}) is missing from service/openapi.py")
        public = is_public(app.view_functions[rule.endpoint])
        path_item = paths.setdefault(_openapi_path(rule.rule), {})
        for method, operation in operations.items():
            operation = {"operationId": rule.endpoint.replace(".", "_") + "_" + method, **operation}
            if settings.auth_enabled and not public:
                operation["responses"] = {**operation["responses"], **_errors(401)}
            elif settings.auth_enabled:
                operation["security"] = []
            path_item[method] = operation

    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Rivulet",
            "version": "1",
            "description": "Streams model output over Server-Sent Events: OpenAI-compatible routes, "
                           "ModelArts-style /v1/sse, model packages. Every error before a stream starts "
                           "is {\"error\": {\"message\", \"type\", \"code\", \"param\"}}.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "responses": {str(status): {"description": text, "content": _json(_ref(ErrorBody))}
                          for status, text in _ERRORS.items()},
        },
    }
    if settings.auth_enabled:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "authToken": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"},
        }
        document["security"] = [{"bearer": []}, {"authToken": []}]
    return document


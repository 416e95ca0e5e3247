"""INPUT_SCHEMA checks at start-up and request bodies checked against a schema (no engine, no torch)."""
from __future__ import annotations

import pytest

from models.errors import CheckpointError, InvalidRequest
from models.package_schema import InputSchema

SCHEMA = {
    "prompt": {"datatype": "STRING", "required": True, "shape": [1], "example": ["hello there"]},
    "max_words": {"datatype": "INT", "required": False, "shape": [1], "example": [4]},
    "upper": {"datatype": "BOOLEAN", "required": False, "shape": [1]},
}


@pytest.fixture(scope="module")
def schema() -> InputSchema:
    return InputSchema.from_declaration(SCHEMA)


def kserve(*items: tuple[str, str, list]) -> dict:
    return {"inputs": [{"name": n, "shape": [1], "datatype": d, "data": v} for n, d, v in items]}


@pytest.mark.parametrize("body, expected", [
    ({"prompt": "hi"}, {"prompt": "hi"}),
    ({"prompt": "hi", "max_words": 2, "upper": True}, {"prompt": "hi", "max_words": 2, "upper": True}),
    ({"inputs": {"prompt": "hi", "upper": False}}, {"prompt": "hi", "upper": False}),
    (kserve(("prompt", "BYTES", ["hi"]), ("max_words", "INT32", [3]), ("upper", "BOOL", [True])),
     {"prompt": "hi", "max_words": 3, "upper": True}),
    # datatype and shape are optional in a KServe input; the schema knows them
    ({"inputs": [{"name": "prompt", "data": ["hi"]}], "id": "req-1"}, {"prompt": "hi"}),
    # objects and arrays for a STRING input arrive as JSON text, as Inferless documents
    ({"prompt": {"role": "user", "text": "hé"}}, {"prompt": '{"role": "user", "text": "hé"}'}),
    (kserve(("prompt", "BYTES", [["a", 1]])), {"prompt": '["a", 1]'}),
])
def test_accepted_bodies(schema, body, expected):
    assert schema.parse(body) == expected


@pytest.mark.parametrize("body, param, words", [
    ({}, "prompt", "is required"),
    ({"max_words": 2}, "prompt", "is required"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": None}, "prompt", "must be a string (datatype STRING), not null"),
    ({"prompt": "hi", "max_words": "3"}, "max_words", "must be an integer"),
    ({"prompt": "hi", "max_words": 2.5}, "max_words", "must be an integer"),
    ({"prompt": "hi", "max_words": True}, "max_words", "must be an integer"),
    ({"prompt": "hi", "max_words": 2**63}, "max_words", "64-bit"),
    ({"prompt": "hi", "upper": 1}, "upper", "must be true or false"),
    ({"prompt": "hi", "temperature": 0.5}, "temperature", "unknown input 'temperature'"),
    ({"inputs": {"prompt": "hi"}, "stream": True}, "stream", "unknown field 'stream' beside 'inputs'"),
    (kserve(("prompt", "BYTES", ["a", "b"])), "prompt", "exactly one value"),
    ({"inputs": [{"name": "prompt", "data": "hi"}]}, "prompt", "exactly one value"),
    ({"inputs": [{"name": "prompt", "shape": [2], "data": ["hi"]}]}, "prompt", "shape [1]"),
    (kserve(("prompt", "INT32", ["hi"])), "prompt", "send datatype BYTES or STRING"),
    (kserve(("max_words", "FP32", [1.0]), ("prompt", "BYTES", ["hi"])), "max_words", "declared INT"),
    (kserve(("prompt", "BYTES", ["a"]), ("prompt", "BYTES", ["b"])), "prompt", "given twice"),
    (kserve(("prompt", "BYTES", ["a"]), ("seed", "INT64", [1])), "seed", "unknown input 'seed'"),
    ({"inputs": [{"name": "prompt", "data": ["a"], "contents": {}}]}, "prompt", "unknown key 'contents'"),
    ({"inputs": ["prompt"]}, "inputs[0]", "must be an object"),
])
def test_rejected_bodies_name_the_field_and_rule(schema, body, param, words):
    with pytest.raises(InvalidRequest) as caught:
        schema.parse(body)
    assert caught.value.param == param
    assert words in caught.value.message


def test_a_body_that_is_not_an_object_is_rejected(schema):
    with pytest.raises(InvalidRequest, match="JSON object"):
        schema.parse(["hi"])


def test_an_input_named_inputs_is_not_mistaken_for_the_envelope():
    schema = InputSchema.from_declaration({"inputs": {"datatype": "STRING", "required": True, "shape": [1]}})
    assert schema.parse({"inputs": "text"}) == {"inputs": "text"}
    assert schema.parse({"inputs": {"inputs": "text"}}) == {"inputs": "text"}


def test_examples_make_a_body(schema):
    assert schema.example_inputs() == {"prompt": "hello there", "max_words": 4}
    assert schema.parse(schema.example_inputs()) == {"prompt": "hello there", "max_words": 4}


def field(**changes):
    return {"datatype": "STRING", "required": True, "shape": [1], "example": ["x"], **changes}


@pytest.mark.parametrize("declared, words", [
    ({"prompt": field(datatype="FP32")}, "datatype: must be INT, STRING or BOOLEAN"),
    ({"prompt": field(datatype="BYTES")}, "not 'BYTES'"),
    ({"prompt": field(shape=[2])}, "only shape [1]"),
    ({"prompt": field(shape=[-1])}, "only shape [1]"),
    ({"prompt": field(required="yes")}, "required"),
    ({"prompt": {"datatype": "STRING", "shape": [1]}}, "required: missing"),
    ({"prompt": field(example=[1])}, "example must hold a string"),
    ({"prompt": field(example=["a", "b"])}, "exactly one value"),
    ({"prompt": field(description="the text")}, "unknown key"),
    ({"prompt": "STRING"}, "must be a dict"),
])
def test_unsupported_schemas_are_refused_naming_the_field(declared, words):
    with pytest.raises(CheckpointError) as caught:
        InputSchema.from_declaration(declared)
    assert "INPUT_SCHEMA['prompt']" in caught.value.message
    assert words in caught.value.message


def test_schema_must_be_a_dict():
    with pytest.raises(CheckpointError, match="must be a dict of input name"):
        InputSchema.from_declaration([("prompt", field())])

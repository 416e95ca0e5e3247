"""Output checks of model packages: JSON-only copies and one schema per request."""
from __future__ import annotations

import pytest

from models.errors import ModelError
from models.package_output import OutputSchema, json_copy


def test_json_copy_is_a_deep_copy_made_of_json_types():
    output = {"scores": (1, 2.5), "nested": {"ok": True, "none": None}}
    copy = json_copy(output)
    output["nested"]["ok"] = False  # infer reusing its dict must not change what was sent
    assert copy == {"scores": [1, 2.5], "nested": {"ok": True, "none": None}}


@pytest.mark.parametrize("output, words", [
    ({1: "a"}, "output keys must be strings, not int"),
    ({"v": {1, 2}}, "output 'v' cannot be sent as JSON (set"),
    ({"v": float("inf")}, "output 'v' cannot be sent as JSON (float"),
    ("text", "an output must be a dict, not str"),
])
def test_what_json_cannot_carry_is_named(output, words):
    with pytest.raises(ModelError) as caught:
        json_copy(output)
    assert words in caught.value.message


def test_ints_and_floats_share_a_schema():
    schema = OutputSchema()
    schema.check({"p": 1, "label": "a"})
    schema.check({"p": 0.5, "label": "b"})  # a float after an int is the same schema: no error
    assert schema.fixed == (("label", "string"), ("p", "number"))
    with pytest.raises(ModelError, match="'p' was number, now string"):  # the schema is still enforced
        schema.check({"p": "0.5", "label": "c"})


@pytest.mark.parametrize("later, words", [
    ({"p": 1}, "missing keys 'label'"),
    ({"p": 1, "label": "a", "extra": []}, "new keys 'extra'"),
    ({"p": None, "label": "a"}, "'p' was number, now null"),
])
def test_a_different_schema_is_described(later, words):
    schema = OutputSchema()
    schema.check({"p": 1, "label": "a"})
    with pytest.raises(ModelError) as caught:
        schema.check(later)
    assert "schema changed mid-stream" in caught.value.message and words in caught.value.message

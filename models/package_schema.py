"""A model package's inputs: Inferless's ``INPUT_SCHEMA``, checked at start-up, and request bodies checked
against it.

Inferless streams only single values of three datatypes (INT, STRING, BOOLEAN, shape [1]); anything
else in a schema is refused when the package loads, naming the field. A request may come in either of
the shapes Inferless clients use:

- KServe v2: ``{"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["..."]}]}``
- a plain object: ``{"prompt": "..."}``, or wrapped: ``{"inputs": {"prompt": "..."}}``

``infer`` receives ``{name: value}`` with single values unwrapped, as Inferless passes them; an object
or array sent for a STRING input arrives as its JSON text (Inferless's rule for structured inputs).
Absent optional inputs are absent from the dict. No torch, no Flask here.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      TypeAdapter, ValidationError, create_model, field_validator, model_validator)

from models.errors import CheckpointError, InvalidRequest

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _structured_as_json(value: Any) -> Any:
    """Inferless passes objects as JSON strings: accept an object/array for a STRING input and send its text."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return value


# What ``infer`` receives for each schema datatype. Strict: "3" is not an INT, 1 is not a BOOLEAN.
VALUE_TYPES: dict[str, Any] = {
    "STRING": Annotated[StrictStr, BeforeValidator(_structured_as_json)],
    "INT": Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)],
    "BOOLEAN": StrictBool,
}
DATATYPE_WORDS = {"STRING": "a string", "INT": "an integer", "BOOLEAN": "true or false"}
# The KServe-v2 datatypes a client may tag an input with, for each schema datatype.
WIRE_DATATYPES = {
    "STRING": frozenset({"BYTES", "STRING"}),
    "INT": frozenset({"INT", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}),
    "BOOLEAN": frozenset({"BOOL", "BOOLEAN"}),
}
KSERVE_INPUT_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})
KSERVE_ENVELOPE_KEYS = frozenset({"id", "parameters", "outputs"})  # allowed beside "inputs"; ignored


class FieldSpec(BaseModel):
    """One entry of ``INPUT_SCHEMA``, exactly as Inferless writes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    datatype: Literal["INT", "STRING", "BOOLEAN"]
    required: StrictBool
    shape: list[int]
    example: list[Any] | None = None  # optional in Inferless's docs; checked against datatype when given

    @field_validator("shape")
    @classmethod
    def _single_value(cls, shape: list[int]) -> list[int]:
        if shape != [1]:
            raise ValueError("only shape [1] is supported (streaming inputs are single values; send "
                             "several values as one JSON string)")
        return shape

    @model_validator(mode="after")
    def _example_matches(self) -> FieldSpec:
        if self.example is not None:
            if len(self.example) != 1:
                raise ValueError("example must hold exactly one value (shape [1])")
            try:
                TypeAdapter(VALUE_TYPES[self.datatype]).validate_python(self.example[0])
            except ValidationError:
                raise ValueError(f"example must hold {DATATYPE_WORDS[self.datatype]} "
                                 f"(datatype {self.datatype}), not {self.example[0]!r}") from None
        return self


class InputSchema:
    """A package's validated ``INPUT_SCHEMA``; ``parse`` turns a request body into ``infer``'s inputs."""

    def __init__(self, fields: Mapping[str, FieldSpec]) -> None:
        self.fields = dict(fields)
        # Field names may be any string (not only identifiers): the model uses aliases.
        model_fields = {
            f"f{i}": (VALUE_TYPES[spec.datatype], Field(... if spec.required else None, alias=name))
            for i, (name, spec) in enumerate(self.fields.items())
        }
        self._model = create_model("PackageInputs", __config__=ConfigDict(extra="forbid", strict=True),
                                   **model_fields)

    @classmethod
    def from_declaration(cls, declared: object, source: str = "input_schema.py") -> InputSchema:
        """Check ``INPUT_SCHEMA`` as the package declares it. Raises CheckpointError naming the field."""
        if not isinstance(declared, dict):
            raise CheckpointError(f"{source}: INPUT_SCHEMA must be a dict of input name -> field, "
                                  f"not {type(declared).__name__}")
        fields = {}
        for name, raw in declared.items():
            where = f"{source}: INPUT_SCHEMA[{name!r}]"
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"{where}: input names must be non-empty strings")
            if not isinstance(raw, dict):
                raise CheckpointError(f"{where} must be a dict with datatype, required, shape (and example)")
            try:
                fields[name] = FieldSpec.model_validate(raw)
            except ValidationError as exc:
                raise CheckpointError(f"{where}: {_describe_spec_errors(exc)}", param=name) from exc
        return cls(fields)

    @property
    def names(self) -> list[str]:
        return list(self.fields)

    def example_inputs(self) -> dict[str, Any]:
        """A plain-object body built from the examples (for docs and demo pages)."""
        return {name: spec.example[0] for name, spec in self.fields.items() if spec.example is not None}

    def parse(self, body: object) -> dict[str, Any]:
        """A request body (any accepted shape) -> ``{name: value}``. Raises InvalidRequest naming the field."""
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object of inputs")
        values = self._flatten(body)
        try:
            parsed = self._model.model_validate(values)
        except ValidationError as exc:
            raise self._invalid(exc.errors()[0]) from exc
        return parsed.model_dump(by_alias=True, exclude_unset=True)

    # --- request shapes ------------------------------------------------------------------------

    def _flatten(self, body: dict[str, Any]) -> dict[str, Any]:
        # {"inputs": [...]} or {"inputs": {...}} is the envelope, unless "inputs" is itself a single-valued
        # input of this package (then its value is a string, number or boolean, never a list or object).
        wrapped = body.get("inputs")
        if not isinstance(wrapped, (list, dict)):
            return body
        for key in body:
            if key != "inputs" and key not in KSERVE_ENVELOPE_KEYS:
                raise InvalidRequest(f"unknown field {key!r} beside 'inputs' (allowed: id, parameters, outputs)",
                                     param=key)
        if isinstance(wrapped, dict):
            return wrapped
        values: dict[str, Any] = {}
        for index, item in enumerate(wrapped):
            name, value = self._kserve_input(index, item)
            if name in values:
                raise InvalidRequest(f"input {name!r} is given twice", param=name)
            values[name] = value
        return values

    def _kserve_input(self, index: int, item: object) -> tuple[str, Any]:
        where = f"inputs[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest(f"{where} must be an object with a string 'name' and a 'data' list",
                                 param=where)
        name = item["name"]
        unknown = sorted(set(item) - KSERVE_INPUT_KEYS)
        if unknown:
            raise InvalidRequest(f"input {name!r} has unknown key {unknown[0]!r} "
                                 f"(allowed: {', '.join(sorted(KSERVE_INPUT_KEYS))})", param=name)
        spec = self.fields.get(name)
        if spec is None:
            raise self._unknown(name)
        if "shape" in item and item["shape"] != [1]:
            raise InvalidRequest(f"input {name!r} must have shape [1], not {item['shape']!r}", param=name)
        datatype = item.get("datatype")
        if datatype is not None and datatype not in WIRE_DATATYPES[spec.datatype]:
            allowed = " or ".join(sorted(WIRE_DATATYPES[spec.datatype]))
            raise InvalidRequest(f"input {name!r} is declared {spec.datatype}: send datatype {allowed}, "
                                 f"not {datatype!r}", param=name)
        data = item.get("data")
        if not isinstance(data, list) or len(data) != 1:
            raise InvalidRequest(f"input {name!r} must carry exactly one value: \"data\": [value] (shape [1])",
                                 param=name)
        return name, data[0]

    # --- errors --------------------------------------------------------------------------------

    def _unknown(self, name: str) -> InvalidRequest:
        known = ", ".join(repr(n) for n in self.fields) or "none"
        return InvalidRequest(f"unknown input {name!r}: this model's inputs are {known}", param=name)

    def _invalid(self, error: dict[str, Any]) -> InvalidRequest:
        name = str(error["loc"][0]) if error["loc"] else "inputs"
        if error["type"] == "extra_forbidden":
            return self._unknown(name)
        if error["type"] == "missing":
            return InvalidRequest(f"input {name!r} is required", param=name)
        spec = self.fields[name]
        if error["type"] in ("greater_than_equal", "less_than_equal"):
            return InvalidRequest(f"input {name!r} must fit in a 64-bit integer (datatype INT)", param=name)
        return InvalidRequest(f"input {name!r} must be {DATATYPE_WORDS[spec.datatype]} "
                              f"(datatype {spec.datatype}), not {_json_kind(error.get('input'))}", param=name)


def _describe_spec_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (allowed: datatype, required, shape, example)"
        elif error["type"] == "missing":
            message = "missing (every input needs datatype, required and shape)"
        elif error["type"] == "literal_error":
            message = f"must be INT, STRING or BOOLEAN (the streaming datatypes), not {error['input']!r}"
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

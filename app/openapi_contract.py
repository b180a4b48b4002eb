"""Makes the OpenAPI document say what the server enforces, no less.

Litestar's generator drops part of a request body's rules (``additionalProperties``, the
constraints of list items, map values and optional fields); msgspec describes the very
structs the server decodes with, so their schemas come from msgspec. What neither can
infer from the types (exactly one of ``command`` and ``args``; the 413 and 503 answers
every operation may give) is stated here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import msgspec
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
)

from app.domain import Chain, Notify, StillRunning
from app.schemas import MAX_BULK_TASKS, BulkCreate, ScheduleRequest, TaskCreate, TaskUpdate

REF_TEMPLATE = "#/components/schemas/{name}"

# Rules across fields, as JSON Schema. ``command``/``args`` may be given as null on create.
_EXACTLY_ONE_PROGRAM: dict[str, Any] = {
    "oneOf": [
        {"required": ["command"], "properties": {"command": {"type": "string"}}},
        {"required": ["args"], "properties": {"args": {"type": "array"}}},
    ]
}
_AT_MOST_ONE_PROGRAM: dict[str, Any] = {"not": {"required": ["command", "args"]}}
_EXACTLY_ONE_WHEN: dict[str, Any] = {
    "oneOf": [
        {"required": [name], "properties": {name: {"type": kind}}}
        for name, kind in [("at", "string"), ("cron", "string"), ("every", "number")]
    ]
}
# A bulk create takes any item: an invalid one is answered in its place (400), not by
# refusing the request, so the document cannot call it invalid data.
_BULK_TASKS: dict[str, Any] = {
    "properties": {
        "tasks": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_BULK_TASKS,
            "description": "Each as the body of `POST /tasks` (`TaskCreate`); an item that "
            "is not one is answered with 400 in its place",
            "items": {"anyOf": [{"$ref": REF_TEMPLATE.format(name=TaskCreate.__name__)}, {}]},
        }
    }
}
REQUEST_BODIES: list[tuple[type[msgspec.Struct], dict[str, Any]]] = [
    (TaskCreate, _EXACTLY_ONE_PROGRAM),
    (BulkCreate, _BULK_TASKS),
    (TaskUpdate, _AT_MOST_ONE_PROGRAM),
    (ScheduleRequest, _EXACTLY_ONE_WHEN),
]
# Structs inside request bodies that answers show too: Litestar describes them for the
# answers, without their rules (unknown fields refused, URL patterns); msgspec's schema
# replaces its one.
EXACT_COMPONENTS = frozenset({Notify.__name__, StillRunning.__name__, Chain.__name__})
# Problem details, as every error answer carries them.
PROBLEM = Schema(
    type=OpenAPIType.OBJECT,
    required=["status_code", "detail"],
    properties={
        "status_code": Schema(type=OpenAPIType.INTEGER),
        "detail": Schema(type=OpenAPIType.STRING),
        "extra": Schema(),
    },
)


def describe_contract(document: OpenAPI, *, max_body_bytes: int) -> None:
    """Rewrite ``document`` in place: exact request bodies, and the 413 and 503 answers."""
    schemas = document.components.schemas
    for struct, rules in REQUEST_BODIES:
        (_,), components = msgspec.json.schema_components([struct], ref_template=REF_TEMPLATE)
        for name, component in components.items():  # the enums it refers to, unless there
            if name in EXACT_COMPONENTS:
                schemas[name] = cast(Schema, _spec(component))
            else:
                schemas.setdefault(name, cast(Schema, _spec(component)))
        schemas[struct.__name__] = cast(Schema, _spec({**components[struct.__name__], **rules}))
    for path, item in (document.paths or {}).items():
        for operation in (item.get, item.put, item.post, item.delete):
            if operation is not None and path.startswith(("/tasks", "/bulk")):
                _declare(operation, max_body_bytes)


def _declare(operation: Operation, max_body_bytes: int) -> None:
    responses = operation.responses if operation.responses is not None else {}
    if operation.request_body is not None:
        responses.setdefault("413", _problem(f"The body is over {max_body_bytes} bytes"))
    responses.setdefault("503", _problem("The store is unavailable; try again later"))
    operation.responses = responses


def _problem(description: str) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=description, content={"application/json": OpenAPIMediaType(schema=PROBLEM)}
    )


# JSON Schema key -> ``Schema`` field name ("maxLength" -> "max_length", "not" -> "schema_not").
_FIELD_OF = {
    field.metadata.get("alias", field.name): field.name for field in dataclasses.fields(Schema)
}


_Properties = Mapping[str, Mapping[str, Any]]


def _spec(schema: Mapping[str, Any]) -> Schema | Reference:
    """Litestar's ``Schema`` for a JSON Schema written by msgspec."""
    if "$ref" in schema:
        ref = Reference(ref=schema["$ref"])
        rest = {key: value for key, value in schema.items() if key != "$ref"}
        return Schema(all_of=[ref], **_fields(rest)) if rest else ref
    return Schema(**_fields(schema))


def _fields(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {_FIELD_OF[key]: _field_value(key, value) for key, value in schema.items()}


def _field_value(key: str, value: Any) -> Any:
    if key in ("allOf", "anyOf", "oneOf"):
        return [_spec(item) for item in cast(list[Mapping[str, Any]], value)]
    if key in ("not", "items", "propertyNames") or (
        key == "additionalProperties" and isinstance(value, Mapping)
    ):
        return _spec(cast(Mapping[str, Any], value))
    if key == "properties":
        return {name: _spec(item) for name, item in cast(_Properties, value).items()}
    if key == "type":
        return OpenAPIType(value)
    if key == "format":
        return OpenAPIFormat(value)
    return value

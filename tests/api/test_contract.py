"""The OpenAPI document states what the server enforces, and OPTIONS names every method.

Runs on every store case (``served`` in conftest.py).
"""

from __future__ import annotations

import pytest

from tests.api.test_api import ENDPOINTS, Client, Json, openapi

BODIES = ["TaskCreate", "TaskUpdate", "ScheduleRequest"]
BODY_OPERATIONS = [
    ("/tasks", "post"),
    ("/tasks/{task_id}", "put"),
    ("/tasks/{task_id}/schedule", "post"),
]


def nullable(schema: Json) -> Json:
    """The non-null alternative of an optional field's schema."""
    for key in ("anyOf", "oneOf"):
        if key in schema:
            [alternative] = [s for s in schema[key] if s.get("type") != "null"]
            return alternative
    return schema


@pytest.mark.parametrize("name", BODIES)
async def test_request_bodies_refuse_unknown_fields_in_the_document(
    client: Client, name: str
) -> None:
    schema = (await openapi(client))["components"]["schemas"][name]

    assert schema["additionalProperties"] is False


async def test_the_document_says_exactly_one_of_command_and_args(client: Client) -> None:
    schemas = (await openapi(client))["components"]["schemas"]

    branches = schemas["TaskCreate"]["oneOf"]
    assert sorted(branch["required"] for branch in branches) == [["args"], ["command"]]
    assert schemas["TaskUpdate"]["not"] == {"required": ["command", "args"]}
    when = schemas["ScheduleRequest"]["oneOf"]
    assert sorted(branch["required"] for branch in when) == [["at"], ["cron"], ["every"]]


async def test_update_fields_keep_their_bounds_in_the_document(client: Client) -> None:
    properties = (await openapi(client))["components"]["schemas"]["TaskUpdate"]["properties"]

    assert properties["retry_backoff"]["minimum"] == 0
    assert properties["misfire_grace"]["minimum"] == 0
    assert properties["max_attempts"]["minimum"] == 1
    assert nullable(properties["timeout"])["exclusiveMinimum"] == 0
    assert properties["success_exit_codes"]["items"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 255,
    }
    assert properties["args"]["items"]["maxLength"] == 16384
    assert properties["env"]["additionalProperties"]["maxLength"] == 16384
    assert properties["env"]["maxProperties"] == 128


async def test_the_document_states_the_full_match_and_nul_patterns(client: Client) -> None:
    properties = (await openapi(client))["components"]["schemas"]["TaskCreate"]["properties"]

    assert nullable(properties["id"])["pattern"].endswith("$(?!\\n)")
    assert properties["env"]["propertyNames"]["pattern"].endswith("$(?!\\n)")
    assert nullable(properties["command"])["pattern"] == "^[^\\x00]*$"
    assert nullable(properties["scheduled_at"])["pattern"].startswith("^(?:000[2-9]")


@pytest.mark.parametrize(("path", "method"), BODY_OPERATIONS)
async def test_operations_with_a_body_declare_413(client: Client, path: str, method: str) -> None:
    responses = (await openapi(client))["paths"][path][method]["responses"]

    assert "413" in responses


@pytest.mark.parametrize(
    ("path", "method"),
    [(path, method) for path, method, *_ in ENDPOINTS if path.startswith("/tasks")],
)
async def test_operations_on_the_store_declare_503(client: Client, path: str, method: str) -> None:
    responses = (await openapi(client))["paths"][path][method]["responses"]

    assert "503" in responses


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/tasks", "GET, OPTIONS, POST"),
        ("/tasks/t1", "DELETE, GET, OPTIONS, PUT"),
        ("/tasks/t1/schedule", "DELETE, OPTIONS, POST"),
        ("/tasks/t1/runs", "GET, OPTIONS"),
        ("/tasks/t1/execute", "OPTIONS, POST"),
    ],
)
async def test_options_names_every_method_of_the_path(
    client: Client, path: str, allowed: str
) -> None:
    response = await client.options(path)

    assert response.status_code == 204
    assert response.headers["allow"] == allowed

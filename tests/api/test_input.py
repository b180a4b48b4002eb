"""Bodies that cannot be read at all (not UTF-8, nested too deeply, not JSON) are a 400
that changes nothing, and the edges of what is accepted. The bad fields themselves (NUL
bytes, trailing newlines, numbers as strings, times at the calendar's edge, zone
directories) are cases of the 400 tests in test_api.py.

Runs on every store case (``served`` in conftest.py), which also refuses any 5xx answer.
"""

from __future__ import annotations

import pytest

from tests.api.test_api import (
    Client,
    assert_problem,
    create_task,
    state_unchanged,
)

JSON_HEADERS = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("body", "mentioned"),
    [
        pytest.param(b'{"name": "\xff\xfe", "command": "true"}', "JSON", id="invalid-utf8"),
        pytest.param(b"[" * 1000 + b"]" * 1000, "nested", id="array-nested-1000-deep"),
        pytest.param(
            b'{"name": "n", "command": "true", "env": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001,
            "nested",
            id="object-nested-1000-deep",
        ),
        pytest.param(b"[" * 100 + b"]" * 100, "object", id="array-nested-100-deep"),
        pytest.param(b'{"name": "n", "command": "true", "timeout": NaN}', "JSON", id="nan"),
        pytest.param(b'{"name": "n", "command": "true", "timeout": Infinity}', "JSON", id="inf"),
        pytest.param(b'{"name": "n", "command": "true", "timeout": 1e999}', "timeout", id="1e999"),
        pytest.param(b"", "a JSON body is required", id="empty"),
        pytest.param(b"  \n", "a JSON body is required", id="blank"),
    ],
)
async def test_create_refuses_an_unreadable_body_with_400(
    client: Client, body: bytes, mentioned: str
) -> None:
    await create_task(client, id="existing")

    async with state_unchanged(client):
        response = await client.post("/tasks", content=body, headers=JSON_HEADERS)

    assert_problem(response, 400, mentioned)


async def test_update_refuses_invalid_utf8_with_400(client: Client) -> None:
    await create_task(client)

    async with state_unchanged(client):
        response = await client.put(
            "/tasks/t1", content=b'{"name": "\xc3\x28"}', headers=JSON_HEADERS
        )

    assert_problem(response, 400, "JSON")


async def test_an_integral_number_is_an_integer_as_in_json_schema(client: Client) -> None:
    task = await create_task(client, max_attempts=2.0, success_exit_codes=[0, 1e0])

    assert task["max_attempts"] == 2
    assert task["success_exit_codes"] == [0, 1]


async def test_the_edges_of_the_range_are_accepted(client: Client) -> None:
    await create_task(client, scheduled_at="0002-01-01T00:00:00+23:59")

    response = await client.post(
        "/tasks/t1/schedule", json={"every": 60, "start": "8999-12-31T23:59:59-23:59"}
    )

    assert response.status_code == 200, response.text
    assert response.json()["scheduled_at"] == "9000-01-01T23:58:59Z"

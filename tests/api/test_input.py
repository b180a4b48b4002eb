"""Hostile and edge-of-range input: every bad body is a 400 naming the field, changes
nothing stored, and nothing a strict reading of the contract refuses is accepted.

Runs on every store case (``served`` in conftest.py), which also refuses any 5xx answer.
"""

from __future__ import annotations

import pytest

from tests.api.test_api import (
    Client,
    Json,
    assert_problem,
    create_task,
    state_unchanged,
    task_spec,
)

JSON_HEADERS = {"content-type": "application/json"}
CALENDAR_END = "9999-12-31T23:59:00Z"
BEFORE_YEAR_ONE_IN_UTC = "0001-01-01T00:00:00+23:59"
AFTER_YEAR_9999_IN_UTC = "9999-12-31T23:59:59-23:59"


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
    ],
)
async def test_create_refuses_an_unreadable_body_with_400(
    client: Client, body: bytes, mentioned: str
) -> None:
    await create_task(client, id="existing")

    async with state_unchanged(client):
        response = await client.post("/tasks", content=body, headers=JSON_HEADERS)

    assert_problem(response, 400, mentioned)


@pytest.mark.parametrize(
    ("fields", "mentioned"),
    [
        pytest.param({"scheduled_at": BEFORE_YEAR_ONE_IN_UTC}, "`scheduled_at`", id="before-1"),
        pytest.param({"scheduled_at": AFTER_YEAR_9999_IN_UTC}, "`scheduled_at`", id="after-9999"),
        pytest.param({"id": "t2\n"}, "(id)", id="id-trailing-newline"),
        pytest.param({"env": {"A\n": "1"}}, "env", id="env-name-trailing-newline"),
        pytest.param({"command": "echo a\0b"}, "(command)", id="nul-in-command"),
        pytest.param({"command": None, "args": ["echo", "a\0"]}, "args", id="nul-in-args"),
        pytest.param({"env": {"A": "x\0y"}}, "env", id="nul-in-env-value"),
        pytest.param({"env": {"A\0": "x"}}, "env", id="nul-in-env-name"),
        pytest.param({"cwd": "/tmp\0"}, "(cwd)", id="nul-in-cwd"),
        pytest.param({"name": "a\0b"}, "(name)", id="nul-in-name"),
        pytest.param({"timeout": "5"}, "(timeout)", id="number-as-string"),
        pytest.param({"max_attempts": 2.5}, "(max_attempts)", id="integer-as-fraction"),
        pytest.param({"max_attempts": "2"}, "(max_attempts)", id="integer-as-string"),
        pytest.param({"max_attempts": True}, "(max_attempts)", id="integer-as-bool"),
        pytest.param({"scheduled_at": 1893456000}, "(scheduled_at)", id="unix-time"),
        pytest.param({"success_exit_codes": ["0"]}, "success_exit_codes", id="codes-as-strings"),
        pytest.param({"misfire_grace": -0.5}, "(misfire_grace)", id="negative-grace"),
        pytest.param({"timeout": 10**30}, "(timeout)", id="huge-timeout"),
        pytest.param({"description": 3}, "(description)", id="description-not-str"),
    ],
)
async def test_create_refuses_bad_fields_with_400(
    client: Client, fields: Json, mentioned: str
) -> None:
    await create_task(client, id="existing")

    async with state_unchanged(client):
        response = await client.post("/tasks", json=task_spec(**{"id": "t2", **fields}))

    assert_problem(response, 400, mentioned)


@pytest.mark.parametrize(
    ("body", "mentioned"),
    [
        pytest.param({"cron": "* * * * *", "start": CALENDAR_END}, "`start`", id="cron-start-9999"),
        pytest.param({"every": 60, "start": CALENDAR_END}, "`start`", id="every-start-9999"),
        pytest.param({"at": "0001-01-01T00:00:00Z"}, "`at`", id="at-in-year-1"),
        pytest.param({"at": BEFORE_YEAR_ONE_IN_UTC}, "`at`", id="at-before-year-1"),
        pytest.param({"at": AFTER_YEAR_9999_IN_UTC}, "`at`", id="at-after-9999"),
        pytest.param(
            {"every": 60, "start": BEFORE_YEAR_ONE_IN_UTC}, "`start`", id="every-start-before-1"
        ),
        pytest.param({"cron": "* * * * *", "end": AFTER_YEAR_9999_IN_UTC}, "`end`", id="end-9999"),
        pytest.param({"cron": "* * * * *", "timezone": "Europe"}, "`timezone`", id="tz-directory"),
        pytest.param({"cron": "* * * * *", "timezone": ""}, "(timezone)", id="tz-empty"),
        pytest.param({"cron": "* * * * *", "timezone": "/etc/UTC"}, "`timezone`", id="tz-path"),
        pytest.param({"cron": "*/0 * * * * *"}, "`cron`", id="cron-step-0-seconds"),
        pytest.param({"cron": "61 * * * * *"}, "`cron`", id="cron-second-61"),
        pytest.param({"cron": ""}, "(cron)", id="cron-empty"),
        pytest.param({"at": 1893456000}, "(at)", id="at-unix-time"),
        pytest.param({"at": "1893456000"}, "(at)", id="at-unix-time-string"),
        pytest.param({"every": "60"}, "(every)", id="every-as-string"),
        pytest.param({"every": 0.5}, "(every)", id="every-tiny"),
        pytest.param({"every": 1e300}, "(every)", id="every-huge"),
    ],
)
async def test_schedule_refuses_bad_times_with_400(
    client: Client, body: Json, mentioned: str
) -> None:
    await create_task(client)

    async with state_unchanged(client):
        response = await client.post("/tasks/t1/schedule", json=body)

    assert_problem(response, 400, mentioned)


@pytest.mark.parametrize(
    ("body", "mentioned"),
    [
        pytest.param({"command": "a\0"}, "(command)", id="nul-in-command"),
        pytest.param({"env": {"PATH\n": "/bin"}}, "env", id="env-name-trailing-newline"),
        pytest.param({"max_attempts": "3"}, "(max_attempts)", id="integer-as-string"),
        pytest.param({"retry_backoff": -1}, "(retry_backoff)", id="negative-backoff"),
    ],
)
async def test_update_refuses_bad_fields_with_400(
    client: Client, body: Json, mentioned: str
) -> None:
    await create_task(client)

    async with state_unchanged(client):
        response = await client.put("/tasks/t1", json=body)

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

"""The HTTP API, driven in process: the real Litestar app over a real ``TaskService`` and store.

Every test runs on the memory store under asyncio and trio, and on Redis (``served`` in
conftest.py). Error cases also check that the stored state did not change, and no request
in this suite may answer 5xx except the deliberate ``/health`` 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import httpx
import pytest

from app.api import HEALTH_CHECK_SECONDS, MAX_BODY_BYTES, MAX_PAGE
from app.domain import MAX_COMMAND_BYTES, utcnow
from app.metrics import CONTENT_TYPE
from tests.api.conftest import serve_api

Client = httpx.AsyncClient
Json = dict[str, Any]

UNREACHABLE_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
TOO_LONG_COMMAND = "é" * (MAX_COMMAND_BYTES // 2 + 1)  # within the limit in chars, not in bytes
CALENDAR_END = "9999-12-31T23:59:00Z"
BEFORE_YEAR_ONE_IN_UTC = "0001-01-01T00:00:00+23:59"
AFTER_YEAR_9999_IN_UTC = "9999-12-31T23:59:59-23:59"


# helpers


def task_spec(**fields: object) -> Json:
    return {"id": "t1", "name": "first", "command": "echo hello", **fields}


async def create_task(client: Client, **fields: object) -> Json:
    response = await client.post("/tasks", json=task_spec(**fields))
    assert response.status_code == 201, response.text
    return response.json()


async def get_task(client: Client, task_id: str) -> Json:
    response = await client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def execute(client: Client, task_id: str) -> Json:
    response = await client.post(f"/tasks/{task_id}/execute")
    assert response.status_code == 202, response.text
    return response.json()


async def list_ids(client: Client, **params: str | int) -> list[str]:
    response = await client.get("/tasks", params=params)
    assert response.status_code == 200, response.text
    return [task["id"] for task in response.json()]


async def stored_state(client: Client) -> list[Json]:
    """Every task, read one by one, with its runs: what an error must leave as it was."""
    ids = await list_ids(client, limit=MAX_PAGE)
    return [
        {
            "task": await get_task(client, task_id),
            "runs": (await client.get(f"/tasks/{task_id}/runs", params={"limit": MAX_PAGE})).json(),
        }
        for task_id in ids
    ]


@asynccontextmanager
async def state_unchanged(client: Client) -> AsyncIterator[None]:
    before = await stored_state(client)
    yield
    assert await stored_state(client) == before


def assert_problem(response: httpx.Response, status_code: int, *mentioned: str) -> None:
    """A JSON problem with ``status_code`` whose detail mentions every text in ``mentioned``."""
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["status_code"] == status_code
    for text in mentioned:
        assert text in body["detail"], body


def parse_utc(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


# GET /health


async def test_health_is_ok_when_store_and_broker_answer(client: Client) -> None:
    with anyio.fail_after(HEALTH_CHECK_SECONDS + 3):
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {
            "broker": {"status": "up", "detail": None},
            "store": {"status": "up", "detail": None},
        },
    }


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a Redis store, so asyncio only
async def test_health_is_503_naming_the_dependency_that_is_down(prefix: str) -> None:
    with anyio.fail_after(HEALTH_CHECK_SECONDS + 3):
        async with serve_api(UNREACHABLE_REDIS_URL, prefix=prefix) as served:
            response = await served.client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["broker"] == {"status": "up", "detail": None}
    assert body["checks"]["store"]["status"] == "down"
    assert body["checks"]["store"]["detail"]


# POST /tasks


async def test_create_answers_201_with_the_full_task(client: Client) -> None:
    before = utcnow()
    response = await client.post("/tasks", json=task_spec(description="says hello"))
    after = utcnow()

    assert response.status_code == 201
    task = response.json()
    assert task == {
        "id": "t1",
        "name": "first",
        "description": "says hello",
        "command": "echo hello",
        "args": None,
        "env": {},
        "cwd": None,
        "timeout": None,
        "status": "created",
        "created_at": task["created_at"],
        "updated_at": task["created_at"],
        "scheduled_at": None,
        "last_run": None,
        "max_attempts": 1,
        "retry_backoff": 10.0,
        "success_exit_codes": [0],
        "misfire": "coalesce",
        "misfire_grace": 60.0,
        "overlap": "queue",
        "queue": "default",
        "paused": False,
        "retry_at": None,
        "schedule": None,
        "schedule_description": None,
        "next_runs": [],
        "active_run": None,
        "notify": None,
        "revision": 0,
    }
    assert before <= parse_utc(task["created_at"]) <= after
    assert await get_task(client, "t1") == task


async def test_create_generates_an_id_when_omitted(client: Client) -> None:
    response = await client.post("/tasks", json={"name": "anonymous", "command": "true"})

    assert response.status_code == 201
    task_id = response.json()["id"]
    assert task_id
    assert await get_task(client, task_id) == response.json()


async def test_create_takes_args_instead_of_command(client: Client) -> None:
    task = await create_task(client, command=None, args=["printf", "%s\n", "a b"])

    assert task["args"] == ["printf", "%s\n", "a b"]
    assert task["command"] is None
    assert await get_task(client, "t1") == task


async def test_create_keeps_env_cwd_timeout_and_scheduled_at_in_utc(client: Client) -> None:
    task = await create_task(
        client,
        env={"GREETING": "hi", "_X1": ""},
        cwd="/tmp",
        timeout=2.5,
        scheduled_at="2030-01-01T02:00:00+02:00",
    )

    assert task["env"] == {"GREETING": "hi", "_X1": ""}
    assert task["cwd"] == "/tmp"
    assert task["timeout"] == 2.5
    assert task["scheduled_at"] == "2030-01-01T00:00:00Z"
    assert await get_task(client, "t1") == task


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"id": "a" * 128}, id="id-128-chars"),
        pytest.param({"id": "A1._-z"}, id="id-punctuation"),
        pytest.param({"name": "n" * 200}, id="name-200-chars"),
        pytest.param({"command": "x" * MAX_COMMAND_BYTES}, id="command-16KiB"),
    ],
)
async def test_create_accepts_the_limits(client: Client, fields: Json) -> None:
    task = await create_task(client, **fields)

    assert await get_task(client, task["id"]) == task


async def test_create_with_an_existing_id_is_409_and_keeps_the_original(client: Client) -> None:
    original = await create_task(client, name="original")

    async with state_unchanged(client):
        response = await client.post("/tasks", json=task_spec(name="impostor"))

    assert_problem(response, 409, "t1")
    assert await get_task(client, "t1") == original


@pytest.mark.parametrize(
    ("body", "mentioned"),
    [
        pytest.param({"command": "true"}, ["`name`"], id="missing-name"),
        pytest.param(task_spec(name=""), ["(name)"], id="empty-name"),
        pytest.param(task_spec(name="n" * 201), ["(name)"], id="name-too-long"),
        pytest.param(task_spec(args=["true"]), ["`command`", "`args`"], id="command-and-args"),
        pytest.param({"name": "nothing"}, ["`command`", "`args`"], id="neither"),
        pytest.param(task_spec(command=""), ["(command)"], id="empty-command"),
        pytest.param(task_spec(command=TOO_LONG_COMMAND), ["`command`"], id="command-bytes"),
        pytest.param(task_spec(command=None, args=[]), ["(args)"], id="empty-args"),
        pytest.param(task_spec(id="bad id"), ["(id)"], id="id-with-space"),
        pytest.param(task_spec(id="-x"), ["(id)"], id="id-leading-dash"),
        pytest.param(task_spec(id="a" * 129), ["(id)"], id="id-129-chars"),
        pytest.param(task_spec(id=""), ["(id)"], id="id-empty"),
        pytest.param(task_spec(status="running"), ["unknown field `status`"], id="status"),
        pytest.param(
            task_spec(created_at="2030-01-01T00:00:00Z"),
            ["unknown field `created_at`"],
            id="created_at",
        ),
        pytest.param(task_spec(revision=7), ["unknown field `revision`"], id="revision"),
        pytest.param(
            task_spec(scheduled_at="2030-01-01T00:00:00"), ["(scheduled_at)"], id="naive-time"
        ),
        pytest.param(task_spec(scheduled_at="tomorrow"), ["(scheduled_at)"], id="garbage-time"),
        pytest.param(task_spec(name=3), ["(name)"], id="name-not-str"),
        pytest.param(task_spec(timeout="soon"), ["(timeout)"], id="timeout-not-number"),
        pytest.param(task_spec(timeout=0), ["(timeout)"], id="timeout-zero"),
        pytest.param(task_spec(env=["A=1"]), ["(env)"], id="env-not-object"),
        pytest.param(task_spec(env={"A-B": "1"}), ["env"], id="env-bad-name"),
        pytest.param(task_spec(command=None, args="ls -l"), ["(args)"], id="args-not-list"),
        pytest.param([task_spec()], ["object"], id="array-body"),
        pytest.param(
            task_spec(scheduled_at=BEFORE_YEAR_ONE_IN_UTC), ["`scheduled_at`"], id="before-1"
        ),
        pytest.param(
            task_spec(scheduled_at=AFTER_YEAR_9999_IN_UTC), ["`scheduled_at`"], id="after-9999"
        ),
        pytest.param(task_spec(id="t2\n"), ["(id)"], id="id-trailing-newline"),
        pytest.param(task_spec(env={"A\n": "1"}), ["env"], id="env-name-trailing-newline"),
        pytest.param(task_spec(command="echo a\0b"), ["(command)"], id="nul-in-command"),
        pytest.param(task_spec(command=None, args=["echo", "a\0"]), ["args"], id="nul-in-args"),
        pytest.param(task_spec(env={"A": "x\0y"}), ["env"], id="nul-in-env-value"),
        pytest.param(task_spec(env={"A\0": "x"}), ["env"], id="nul-in-env-name"),
        pytest.param(task_spec(cwd="/tmp\0"), ["(cwd)"], id="nul-in-cwd"),
        pytest.param(task_spec(name="a\0b"), ["(name)"], id="nul-in-name"),
        pytest.param(task_spec(timeout="5"), ["(timeout)"], id="number-as-string"),
        pytest.param(task_spec(max_attempts=2.5), ["(max_attempts)"], id="integer-as-fraction"),
        pytest.param(task_spec(max_attempts="2"), ["(max_attempts)"], id="integer-as-string"),
        pytest.param(task_spec(max_attempts=True), ["(max_attempts)"], id="integer-as-bool"),
        pytest.param(task_spec(scheduled_at=1893456000), ["(scheduled_at)"], id="unix-time"),
        pytest.param(
            task_spec(success_exit_codes=["0"]), ["success_exit_codes"], id="codes-as-strings"
        ),
        pytest.param(task_spec(misfire_grace=-0.5), ["(misfire_grace)"], id="negative-grace"),
        pytest.param(task_spec(timeout=10**30), ["(timeout)"], id="huge-timeout"),
        pytest.param(task_spec(description=3), ["(description)"], id="description-not-str"),
    ],
)
async def test_create_refuses_an_invalid_task_with_400(
    client: Client, body: object, mentioned: list[str]
) -> None:
    await create_task(client, id="existing")

    async with state_unchanged(client):
        response = await client.post("/tasks", json=body)

    assert_problem(response, 400, *mentioned)


async def test_create_refuses_a_body_that_is_not_json_with_400(client: Client) -> None:
    async with state_unchanged(client):
        response = await client.post(
            "/tasks", content=b"{name: first", headers={"content-type": "application/json"}
        )

    assert_problem(response, 400, "JSON")


async def test_create_refuses_a_body_over_1_mib_with_413(client: Client) -> None:
    async with state_unchanged(client):
        response = await client.post("/tasks", json=task_spec(description="x" * MAX_BODY_BYTES))

    assert_problem(response, 413)


# GET /tasks


async def test_list_is_an_empty_array_without_tasks(client: Client) -> None:
    response = await client.get("/tasks")

    assert response.status_code == 200
    assert response.json() == []
    assert "x-next-cursor" not in response.headers


async def test_list_returns_every_task_in_id_order(client: Client) -> None:
    created = {task_id: await create_task(client, id=task_id) for task_id in ["c", "a", "b"]}

    response = await client.get("/tasks")

    assert response.status_code == 200
    assert response.json() == [created["a"], created["b"], created["c"]]
    assert "x-next-cursor" not in response.headers


async def test_list_filters_by_status(client: Client) -> None:
    for task_id in ["a", "b", "c"]:
        await create_task(client, id=task_id)
    await execute(client, "b")

    assert await list_ids(client, status="pending") == ["b"]
    assert await list_ids(client, status="created") == ["a", "c"]
    assert await list_ids(client, status="running") == []


async def test_list_pages_follow_x_next_cursor_to_every_task_once(client: Client) -> None:
    for task_id in ["e", "d", "c", "b", "a"]:
        await create_task(client, id=task_id)
    pages: list[list[str]] = []
    params: dict[str, str | int] = {"limit": 2}

    while True:
        response = await client.get("/tasks", params=params)
        assert response.status_code == 200
        pages.append([task["id"] for task in response.json()])
        cursor = response.headers.get("x-next-cursor")
        if cursor is None:
            break
        params = {"limit": 2, "cursor": cursor}

    assert pages == [["a", "b"], ["c", "d"], ["e"]]


async def test_list_has_no_cursor_on_a_full_last_page(client: Client) -> None:
    for task_id in ["a", "b", "c", "d"]:
        await create_task(client, id=task_id)

    first = await client.get("/tasks", params={"limit": 2})
    last = await client.get("/tasks", params={"limit": 2, "cursor": first.headers["x-next-cursor"]})

    assert [task["id"] for task in last.json()] == ["c", "d"]
    assert "x-next-cursor" not in last.headers


async def test_list_pages_a_status_filter(client: Client) -> None:
    for task_id in ["a", "b", "c", "d"]:
        await create_task(client, id=task_id)
    for task_id in ["a", "c", "d"]:
        await execute(client, task_id)

    first = await client.get("/tasks", params={"status": "pending", "limit": 2})
    cursor = first.headers["x-next-cursor"]
    last = await client.get("/tasks", params={"status": "pending", "limit": 2, "cursor": cursor})

    assert [task["id"] for task in first.json()] == ["a", "c"]
    assert [task["id"] for task in last.json()] == ["d"]
    assert "x-next-cursor" not in last.headers


@pytest.mark.parametrize(
    ("params", "mentioned"),
    [
        pytest.param({"limit": 0}, "limit", id="limit-0"),
        pytest.param({"limit": MAX_PAGE + 1}, "limit", id="limit-1001"),
        pytest.param({"limit": "ten"}, "limit", id="limit-not-int"),
        pytest.param({"status": "bogus"}, "status", id="status-bogus"),
        pytest.param({"cursor": "garbage"}, "cursor", id="cursor-garbage"),
        pytest.param({"cursor": "!!"}, "cursor", id="cursor-not-base64"),
        pytest.param({"cursor": "x" * 2000}, "cursor", id="cursor-too-long"),
    ],
)
async def test_list_refuses_a_bad_query_with_400(
    client: Client, params: dict[str, str | int], mentioned: str
) -> None:
    await create_task(client)

    response = await client.get("/tasks", params=params)

    assert_problem(response, 400, mentioned)


# GET /tasks/{id}


async def test_get_returns_the_task(client: Client) -> None:
    created = await create_task(client)

    response = await client.get("/tasks/t1")

    assert response.status_code == 200
    assert response.json() == created


async def test_get_an_unknown_task_is_404(client: Client) -> None:
    response = await client.get("/tasks/missing")

    assert_problem(response, 404, "missing")


# PUT /tasks/{id}


async def test_update_changes_given_fields_and_keeps_the_rest(client: Client) -> None:
    created = await create_task(client, description="old", env={"A": "1"}, timeout=5)

    response = await client.put("/tasks/t1", json={"name": "renamed", "env": {"B": "2"}})

    assert response.status_code == 200
    updated = response.json()
    assert updated == {
        **created,
        "name": "renamed",
        "env": {"B": "2"},
        "updated_at": updated["updated_at"],
        "revision": 1,
    }
    assert parse_utc(updated["updated_at"]) > parse_utc(created["updated_at"])
    assert await get_task(client, "t1") == updated


async def test_update_sets_the_misfire_and_overlap_policies(client: Client) -> None:
    await create_task(client, misfire="skip", misfire_grace=5)

    response = await client.put("/tasks/t1", json={"misfire_grace": 120, "overlap": "forbid"})

    assert response.status_code == 200
    policies = {k: response.json()[k] for k in ("misfire", "misfire_grace", "overlap")}
    assert policies == {"misfire": "skip", "misfire_grace": 120.0, "overlap": "forbid"}
    assert await get_task(client, "t1") == response.json()


async def test_update_increments_the_revision_each_time(client: Client) -> None:
    await create_task(client)

    first = (await client.put("/tasks/t1", json={"description": "one"})).json()
    second = (await client.put("/tasks/t1", json={"description": "two"})).json()

    assert (first["revision"], second["revision"]) == (1, 2)
    assert parse_utc(second["updated_at"]) > parse_utc(first["updated_at"])


async def test_update_command_replaces_args(client: Client) -> None:
    await create_task(client, command=None, args=["true"])

    updated = (await client.put("/tasks/t1", json={"command": "echo hi"})).json()

    assert (updated["command"], updated["args"]) == ("echo hi", None)
    assert await get_task(client, "t1") == updated


async def test_update_args_replace_command(client: Client) -> None:
    await create_task(client)

    updated = (await client.put("/tasks/t1", json={"args": ["echo", "hi"]})).json()

    assert (updated["command"], updated["args"]) == (None, ["echo", "hi"])
    assert await get_task(client, "t1") == updated


async def test_update_null_clears_timeout_and_cwd(client: Client) -> None:
    await create_task(client, timeout=5, cwd="/tmp")

    updated = (await client.put("/tasks/t1", json={"timeout": None, "cwd": None})).json()

    assert (updated["timeout"], updated["cwd"]) == (None, None)
    assert await get_task(client, "t1") == updated


async def test_update_an_unknown_task_is_404(client: Client) -> None:
    async with state_unchanged(client):
        response = await client.put("/tasks/missing", json={"name": "x"})

    assert_problem(response, 404, "missing")


@pytest.mark.parametrize(
    ("body", "mentioned"),
    [
        pytest.param({"name": ""}, ["(name)"], id="empty-name"),
        pytest.param({"name": None}, ["(name)"], id="null-name"),
        pytest.param({"name": "n" * 201}, ["(name)"], id="name-too-long"),
        pytest.param({"command": ""}, ["(command)"], id="empty-command"),
        pytest.param({"command": TOO_LONG_COMMAND}, ["`command`"], id="command-bytes"),
        pytest.param({"command": "a", "args": ["b"]}, ["`command`", "`args`"], id="both"),
        pytest.param({"command": None}, ["(command)"], id="null-command"),
        pytest.param({"timeout": -1}, ["(timeout)"], id="negative-timeout"),
        pytest.param({"cwd": ""}, ["(cwd)"], id="empty-cwd"),
        pytest.param({"env": {"1A": "x"}}, ["env"], id="env-bad-name"),
        pytest.param({"misfire": "later"}, ["(misfire)"], id="bad-misfire"),
        pytest.param({"misfire_grace": -1}, ["(misfire_grace)"], id="negative-grace"),
        pytest.param({"overlap": "allow"}, ["(overlap)"], id="overlap-allow"),
        pytest.param({"id": "other"}, ["unknown field `id`"], id="id"),
        pytest.param({"status": "completed"}, ["unknown field `status`"], id="status"),
        pytest.param(
            {"updated_at": "2030-01-01T00:00:00Z"}, ["unknown field `updated_at`"], id="updated_at"
        ),
        pytest.param({"revision": 9}, ["unknown field `revision`"], id="revision"),
        pytest.param({"colour": "red"}, ["unknown field `colour`"], id="unknown"),
        pytest.param("rename", ["object"], id="string-body"),
        pytest.param({"command": "a\0"}, ["(command)"], id="nul-in-command"),
        pytest.param({"env": {"PATH\n": "/bin"}}, ["env"], id="env-name-trailing-newline"),
        pytest.param({"max_attempts": "3"}, ["(max_attempts)"], id="integer-as-string"),
        pytest.param({"retry_backoff": -1}, ["(retry_backoff)"], id="negative-backoff"),
    ],
)
async def test_update_refuses_invalid_fields_with_400(
    client: Client, body: object, mentioned: list[str]
) -> None:
    await create_task(client, timeout=5, cwd="/tmp")

    async with state_unchanged(client):
        response = await client.put("/tasks/t1", json=body)

    assert_problem(response, 400, *mentioned)


async def test_update_refuses_a_body_that_is_not_json_with_400(client: Client) -> None:
    await create_task(client)

    async with state_unchanged(client):
        response = await client.put(
            "/tasks/t1", content=b"name=x", headers={"content-type": "application/json"}
        )

    assert_problem(response, 400, "JSON")


# DELETE /tasks/{id}


async def test_delete_answers_204_and_the_task_and_its_runs_are_gone(client: Client) -> None:
    await create_task(client)
    await create_task(client, id="kept")
    run = await execute(client, "t1")

    response = await client.delete("/tasks/t1")

    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get("/tasks/t1"), 404)
    assert_problem(await client.get("/tasks/t1/runs"), 404)
    assert_problem(await client.get(f"/tasks/t1/runs/{run['run_id']}"), 404)
    assert await list_ids(client) == ["kept"]


async def test_delete_an_unknown_task_is_404(client: Client) -> None:
    await create_task(client)

    async with state_unchanged(client):
        response = await client.delete("/tasks/missing")

    assert_problem(response, 404, "missing")


# POST /tasks/{id}/execute


async def test_execute_answers_202_with_the_queued_run(client: Client) -> None:
    created = await create_task(client)

    response = await client.post("/tasks/t1/execute")

    assert response.status_code == 202
    run = response.json()
    assert run == {
        "run_id": run["run_id"],
        "task_id": "t1",
        "attempt": 1,
        "status": "queued",
        "queued_at": run["queued_at"],
        "not_before": None,
        "started_at": None,
        "finished_at": None,
        "exit_code": None,
        "duration": None,
        "output": "",
        "truncated": False,
        "timed_out": False,
        "error": None,
        "worker": None,
        "queue": "default",
        "dead_letters": 0,
        "notifications": [],
    }
    assert run["run_id"]
    task = await get_task(client, "t1")
    assert task["status"] == "pending"
    assert task["active_run"] == {"run_id": run["run_id"], "attempt": 1, "not_before": None}
    assert task["revision"] == created["revision"] + 1


async def test_execute_while_pending_is_409_and_changes_nothing(client: Client) -> None:
    await create_task(client)
    await execute(client, "t1")

    async with state_unchanged(client):
        response = await client.post("/tasks/t1/execute")

    assert_problem(response, 409, "pending")


async def test_execute_after_a_finished_run_queues_a_new_one(
    client: Client, finish_active_run: Callable[[str], Awaitable[None]]
) -> None:
    await create_task(client)
    first = await execute(client, "t1")
    await finish_active_run("t1")

    second = await execute(client, "t1")

    assert second["run_id"] != first["run_id"]
    task = await get_task(client, "t1")
    assert task["status"] == "pending"
    assert task["last_run"]["run_id"] == first["run_id"]
    assert task["active_run"]["run_id"] == second["run_id"]


async def test_execute_an_unknown_task_is_404(client: Client) -> None:
    async with state_unchanged(client):
        response = await client.post("/tasks/missing/execute")

    assert_problem(response, 404, "missing")


# POST /tasks/{id}/schedule


async def test_schedule_sets_scheduled_at_in_utc(client: Client) -> None:
    created = await create_task(client)

    response = await client.post("/tasks/t1/schedule", json={"at": "2030-06-01T17:30:00+02:00"})

    assert response.status_code == 200
    task = response.json()
    assert task == {
        **created,
        "status": "pending",  # waiting for its time: a run is coming
        "scheduled_at": "2030-06-01T15:30:00Z",
        "next_runs": ["2030-06-01T15:30:00Z"],
        "updated_at": task["updated_at"],
        "revision": 1,
    }
    assert await get_task(client, "t1") == task


@pytest.mark.parametrize(
    ("body", "mentioned"),
    [
        pytest.param({}, "`at`", id="missing-at"),
        pytest.param({"at": "2030-01-01T00:00:00"}, "(at)", id="naive"),
        pytest.param({"at": "next tuesday"}, "(at)", id="garbage"),
        pytest.param({"at": None}, "`at`", id="null"),
        pytest.param({"at": "2030-01-01T00:00:00Z", "when": "now"}, "`when`", id="unknown-field"),
    ],
)
async def test_schedule_refuses_a_bad_time_with_400(
    client: Client, body: Json, mentioned: str
) -> None:
    await create_task(client)

    async with state_unchanged(client):
        response = await client.post("/tasks/t1/schedule", json=body)

    assert_problem(response, 400, mentioned)


async def test_schedule_an_unknown_task_is_404(client: Client) -> None:
    async with state_unchanged(client):
        response = await client.post("/tasks/missing/schedule", json={"at": "2030-01-01T00:00:00Z"})

    assert_problem(response, 404, "missing")


# GET /tasks/{id}/runs and /tasks/{id}/runs/{run_id}


async def test_runs_list_the_run_queued_by_execute(client: Client) -> None:
    await create_task(client)
    run = await execute(client, "t1")

    response = await client.get("/tasks/t1/runs")

    assert response.status_code == 200
    del run["output"]  # left out of lists unless asked for (tests/api/test_bounds.py)
    assert response.json() == [run]


async def test_runs_of_a_task_never_run_are_an_empty_array(client: Client) -> None:
    await create_task(client)

    response = await client.get("/tasks/t1/runs")

    assert response.status_code == 200
    assert response.json() == []


async def test_runs_are_newest_first_and_limited(
    client: Client, finish_active_run: Callable[[str], Awaitable[None]]
) -> None:
    await create_task(client)
    queued: list[str] = []
    for _ in range(3):
        queued.append((await execute(client, "t1"))["run_id"])
        await finish_active_run("t1")

    everything = (await client.get("/tasks/t1/runs")).json()
    newest_two = (await client.get("/tasks/t1/runs", params={"limit": 2})).json()

    # Run ids start with their millisecond, so newest first is descending id order.
    assert [run["run_id"] for run in everything] == sorted(queued, reverse=True)
    assert [run["status"] for run in everything] == ["completed"] * 3
    assert newest_two == everything[:2]


async def test_get_run_returns_the_run(client: Client) -> None:
    await create_task(client)
    run = await execute(client, "t1")

    response = await client.get(f"/tasks/t1/runs/{run['run_id']}")

    assert response.status_code == 200
    assert response.json() == run


async def test_get_run_returns_the_finished_run_with_its_output(
    client: Client, finish_active_run: Callable[[str], Awaitable[None]]
) -> None:
    await create_task(client)
    run = await execute(client, "t1")
    await finish_active_run("t1")

    finished = (await client.get(f"/tasks/t1/runs/{run['run_id']}")).json()

    assert finished["status"] == "completed"
    assert (finished["exit_code"], finished["output"]) == (0, "hello\n")
    assert finished["worker"] == "test-worker"


@pytest.mark.parametrize(
    ("path", "mentioned"),
    [
        pytest.param("/tasks/missing/runs", "'missing'", id="runs-of-unknown-task"),
        pytest.param("/tasks/missing/runs/r1", "'missing'", id="run-of-unknown-task"),
        pytest.param("/tasks/t1/runs/unknown-run", "'unknown-run'", id="unknown-run"),
    ],
)
async def test_runs_of_unknown_things_are_404(client: Client, path: str, mentioned: str) -> None:
    await create_task(client)
    await execute(client, "t1")

    response = await client.get(path)

    assert_problem(response, 404, mentioned)


@pytest.mark.parametrize("limit", [0, MAX_PAGE + 1, "all"])
async def test_runs_refuse_a_bad_limit_with_400(client: Client, limit: int | str) -> None:
    await create_task(client)

    response = await client.get("/tasks/t1/runs", params={"limit": limit})

    assert_problem(response, 400, "limit")


# OpenAPI


@pytest.mark.parametrize(
    ("path", "content"),
    [
        pytest.param("/schema", "swagger-ui", id="openapi-ui"),
        # The dashboard (see test_dashboard_files.py), its script loaded as a module.
        pytest.param("/ui/", '<script type="module" src="/ui/js/main.js">', id="dashboard"),
    ],
)
async def test_html_pages(client: Client, path: str, content: str) -> None:
    response = await client.get(path)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert content in response.text


@pytest.mark.parametrize(
    ("path", "target"),
    [
        pytest.param("/swagger/index.html", "/schema", id="swagger-to-the-schema"),
        pytest.param("/", "/ui/", id="root-to-the-dashboard"),
    ],
)
async def test_redirects(client: Client, path: str, target: str) -> None:
    response = await client.get(path, follow_redirects=False)

    assert 300 <= response.status_code < 400
    assert response.headers["location"] == target


async def openapi(client: Client) -> Json:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    return response.json()


ENDPOINTS = [
    # path, method, success status, response schema ("[X]": array of X), error statuses
    ("/health", "get", "200", "Health", {"503"}),
    ("/health", "head", "200", None, {"503"}),
    ("/metrics", "get", "200", CONTENT_TYPE, set()),
    ("/tasks", "post", "201", "TaskResponse", {"400", "409"}),
    ("/tasks", "get", "200", "[TaskResponse]", {"400"}),
    ("/tasks/scheduled", "get", "200", "[UpcomingFire]", {"400"}),
    ("/tasks/scheduled", "put", "200", "TaskResponse", {"400", "404"}),
    ("/tasks/scheduled", "delete", "204", None, {"404"}),
    ("/bulk/tasks", "post", "200", "[CreateResult]", {"400", "413"}),
    ("/tasks/{task_id}", "get", "200", "TaskResponse", {"404"}),
    ("/tasks/{task_id}", "put", "200", "TaskResponse", {"400", "404"}),
    ("/tasks/{task_id}", "delete", "204", None, {"404"}),
    ("/tasks/{task_id}/execute", "post", "202", "RunShown", {"404", "409"}),
    ("/tasks/{task_id}/schedule", "post", "200", "TaskResponse", {"400", "404"}),
    ("/tasks/{task_id}/schedule", "delete", "200", "TaskResponse", {"404"}),
    ("/tasks/{task_id}/cancel", "post", "202", "TaskResponse", {"404", "409"}),
    ("/tasks/{task_id}/pause", "post", "200", "TaskResponse", {"404", "409"}),
    ("/tasks/{task_id}/resume", "post", "200", "TaskResponse", {"404", "409"}),
    ("/tasks/{task_id}/runs", "get", "200", "[RunListed]", {"400", "404"}),
    ("/tasks/{task_id}/runs/{run_id}", "get", "200", "RunShown", {"404"}),
    ("/tasks/{task_id}/runs/{run_id}/output", "get", "200", "text/event-stream", {"400", "404"}),
    ("/events", "get", "200", "text/event-stream", {"400"}),
]


def schema_name(schema: Json) -> str:
    if schema.get("type") == "array":
        return f"[{schema_name(schema['items'])}]"
    return schema["$ref"].removeprefix("#/components/schemas/")


@pytest.mark.parametrize(
    ("path", "method", "success", "body", "errors"),
    [pytest.param(*endpoint, id=f"{endpoint[1]} {endpoint[0]}") for endpoint in ENDPOINTS],
)
async def test_openapi_documents_each_operation_with_its_responses(
    client: Client, path: str, method: str, success: str, body: str | None, errors: set[str]
) -> None:
    responses = (await openapi(client))["paths"][path][method]["responses"]

    assert success in responses
    assert errors <= set(responses)
    content = responses[success].get("content")
    if body is None:
        assert content is None
    elif "/" in body:  # a media type: a stream, not a JSON document
        assert set(content) == {body}
    else:
        assert schema_name(content["application/json"]["schema"]) == body


async def test_openapi_lists_no_operations_beyond_the_known_ones(client: Client) -> None:
    paths = (await openapi(client))["paths"]

    documented = {(path, method) for path, operations in paths.items() for method in operations}

    assert documented == {(path, method) for path, method, *_ in ENDPOINTS}


@pytest.mark.parametrize(
    ("path", "method", "schema"),
    [
        ("/tasks", "post", "TaskCreate"),
        ("/bulk/tasks", "post", "BulkCreate"),
        ("/tasks/{task_id}", "put", "TaskUpdate"),
        ("/tasks/{task_id}/schedule", "post", "ScheduleRequest"),
    ],
)
async def test_openapi_documents_the_request_bodies(
    client: Client, path: str, method: str, schema: str
) -> None:
    document = await openapi(client)

    request_body = document["paths"][path][method]["requestBody"]

    assert request_body["required"] is True
    assert schema_name(request_body["content"]["application/json"]["schema"]) == schema
    assert schema in document["components"]["schemas"]


async def test_openapi_request_bodies_leave_out_server_owned_fields(client: Client) -> None:
    schemas = (await openapi(client))["components"]["schemas"]

    for name in ["TaskCreate", "TaskUpdate"]:
        assert not {"status", "created_at", "updated_at", "revision"} & set(
            schemas[name]["properties"]
        )


async def test_openapi_documents_the_next_cursor_header(client: Client) -> None:
    listing = (await openapi(client))["paths"]["/tasks"]["get"]["responses"]["200"]

    assert "X-Next-Cursor" in listing["headers"]


# recurring schedules and DELETE /tasks/{id}/schedule


async def test_schedule_on_cron_shows_the_next_five_runs_in_utc(client: Client) -> None:
    await create_task(client)

    response = await client.post(
        "/tasks/t1/schedule", json={"cron": "0 9 * * *", "timezone": "Europe/Berlin"}
    )

    assert response.status_code == 200
    task = response.json()
    assert task["schedule"] == {
        "cron": "0 9 * * *",
        "timezone": "Europe/Berlin",
        "every": None,
        "start": None,
        "end": None,
    }
    runs = [parse_utc(moment) for moment in task["next_runs"]]
    assert len(runs) == 5 and runs == sorted(runs) and runs[0] > utcnow()
    assert all(run.minute == 0 and run.hour in (7, 8) for run in runs)  # 09:00 in Berlin
    assert task["scheduled_at"] == task["next_runs"][0]
    assert task["schedule_description"] == "At 09:00 (Europe/Berlin)"
    assert (await get_task(client, "t1"))["schedule_description"] == "At 09:00 (Europe/Berlin)"


async def test_schedule_every_is_anchored_at_its_start(client: Client) -> None:
    await create_task(client)

    response = await client.post(
        "/tasks/t1/schedule", json={"every": 3600, "start": "2030-01-01T00:00:00Z"}
    )

    assert response.status_code == 200
    assert response.json()["next_runs"] == [f"2030-01-01T0{h}:00:00Z" for h in range(5)]
    assert response.json()["schedule_description"] == "Every hour"


async def test_a_schedule_that_never_fires_is_refused(client: Client) -> None:
    await create_task(client)
    async with state_unchanged(client):
        response = await client.post(
            "/tasks/t1/schedule", json={"cron": "* * * * *", "end": "2001-01-01T00:00:00Z"}
        )

    assert_problem(response, 400, "never")


@pytest.mark.parametrize(
    ("body", "mentioned"),
    [
        pytest.param({"cron": "not a cron"}, "cron", id="bad-cron"),
        pytest.param({"cron": "* * * * *", "timezone": "Nowhere/Land"}, "timezone", id="bad-tz"),
        pytest.param({"cron": "* * * * *", "every": 60}, "exactly one", id="cron-and-every"),
        pytest.param({"every": 0}, "every", id="zero-interval"),
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
async def test_a_bad_recurrence_is_400_and_changes_nothing(
    client: Client, body: Json, mentioned: str
) -> None:
    await create_task(client)
    async with state_unchanged(client):
        response = await client.post("/tasks/t1/schedule", json=body)

    assert_problem(response, 400, mentioned)


async def test_unschedule_clears_the_schedule(client: Client) -> None:
    await create_task(client)
    await client.post("/tasks/t1/schedule", json={"every": 60})

    response = await client.delete("/tasks/t1/schedule")

    assert response.status_code == 200
    task = response.json()
    assert (task["scheduled_at"], task["schedule"], task["next_runs"]) == (None, None, [])
    assert task["schedule_description"] is None
    assert (await get_task(client, "t1")) == task


async def test_unschedule_an_unknown_task_is_404(client: Client) -> None:
    async with state_unchanged(client):
        response = await client.delete("/tasks/missing/schedule")

    assert_problem(response, 404, "missing")


async def test_pause_stops_scheduled_fires_and_resume_goes_on_from_now(client: Client) -> None:
    await create_task(client)
    scheduled = (await client.post("/tasks/t1/schedule", json={"every": 3600})).json()

    paused = await client.post("/tasks/t1/pause")
    assert paused.status_code == 200
    assert paused.json()["paused"] is True
    assert paused.json()["schedule"] == scheduled["schedule"]

    resumed = await client.post("/tasks/t1/resume")
    assert resumed.status_code == 200
    task = resumed.json()
    assert task["paused"] is False
    assert task["next_runs"][0] >= scheduled["next_runs"][0]


@pytest.mark.parametrize(
    ("action", "mentioned"),
    [("pause", "no schedule to pause"), ("resume", "not paused")],
)
async def test_pause_and_resume_out_of_turn_are_409(
    client: Client, action: str, mentioned: str
) -> None:
    await create_task(client)
    async with state_unchanged(client):
        response = await client.post(f"/tasks/t1/{action}")

    assert_problem(response, 409, mentioned)


async def test_cancel_of_a_pending_task_closes_its_queued_run(client: Client) -> None:
    await create_task(client)
    queued = await execute(client, "t1")

    response = await client.post("/tasks/t1/cancel")

    assert response.status_code == 202
    task = response.json()
    assert task["status"] == "cancelled" and task["active_run"] is None
    run = (await client.get(f"/tasks/t1/runs/{queued['run_id']}")).json()
    assert (run["status"], run["error"]) == ("cancelled", "cancelled")


async def test_cancel_with_nothing_active_is_409(client: Client) -> None:
    await create_task(client)
    async with state_unchanged(client):
        response = await client.post("/tasks/t1/cancel")

    assert_problem(response, 409, "nothing to cancel")

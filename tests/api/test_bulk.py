"""``POST /bulk/tasks``: many tasks in one request, each answered as ``POST /tasks`` would
answer it alone. Runs on the memory store (asyncio, trio) and on Redis (``served``)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from app.schemas import MAX_BULK_TASKS
from tests.api.conftest import Served
from tests.api.test_api import Client, assert_problem, create_task, state_unchanged, task_spec

Json = dict[str, Any]


def spec(task_id: str, **fields: object) -> Json:
    return {"id": task_id, "name": task_id, "command": "true", **fields}


async def bulk(client: Client, tasks: object) -> list[Json]:
    response = await client.post("/bulk/tasks", json={"tasks": tasks})
    assert response.status_code == 200, response.text
    return response.json()


async def test_each_task_is_answered_in_order_and_only_valid_new_ones_are_created(
    client: Client,
) -> None:
    existing = await create_task(client, id="taken", name="original")

    answers = await bulk(
        client,
        [spec("a"), spec("bad", name=""), spec("taken"), spec("a", name="again"), spec("b")],
    )

    assert [answer["status"] for answer in answers] == [201, 400, 409, 409, 201]
    assert answers[0]["task"]["id"] == "a" and answers[4]["task"]["id"] == "b"
    assert "name" in answers[1]["detail"]
    assert answers[2]["detail"] == "task 'taken' already exists"
    assert answers[3]["detail"] == "task 'a' already exists"
    assert {"task"} & set(answers[1]) == set() and "detail" not in answers[0]
    listed = (await client.get("/tasks")).json()
    assert [task["id"] for task in listed] == ["a", "b", "taken"]
    assert next(t for t in listed if t["id"] == "a")["name"] == "a"  # the first one won
    assert next(t for t in listed if t["id"] == "taken") == existing


async def test_a_created_task_is_answered_as_post_tasks_answers_it(client: Client) -> None:
    [answer] = await bulk(client, [spec("a", env={"A": "1"})])

    stored = (await client.get("/tasks/a")).json()
    alone = (await client.post("/tasks", json=spec("b", env={"A": "1"}))).json()
    assert answer["task"] == stored
    assert set(answer["task"]) == set(alone)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"name": "n"}, id="no-program"),
        pytest.param({"name": "n", "command": "x", "args": ["y"]}, id="both-programs"),
        pytest.param({"name": "n", "command": "x", "status": "running"}, id="server-field"),
        pytest.param({"id": "bad id", "name": "n", "command": "x"}, id="bad-id"),
        pytest.param({"name": "n", "command": "x", "timeout": "5"}, id="string-for-number"),
        pytest.param({"name": "n", "command": "x", "scheduled_at": 1893456000}, id="number-time"),
        pytest.param({"name": "n", "command": "x", "env": {"1A": "x"}}, id="bad-env-name"),
        pytest.param({"name": "n", "command": "x", "max_attempts": 2.5}, id="fraction"),
        pytest.param(5, id="not-an-object"),
        pytest.param([{"name": "n"}], id="a-list"),
    ],
)
async def test_an_invalid_task_gets_the_answer_post_tasks_gives_it(
    client: Client, body: object
) -> None:
    async with state_unchanged(client):
        alone = await client.post("/tasks", json=body)
        [answer] = await bulk(client, [body])

    assert alone.status_code == 400
    assert answer == {"status": 400, "detail": alone.json()["detail"]}


async def test_a_valid_task_reads_numbers_as_post_tasks_does(client: Client) -> None:
    [answer] = await bulk(client, [spec("a", max_attempts=2.0, timeout=5)])

    assert answer["status"] == 201, answer
    assert answer["task"]["max_attempts"] == 2 and answer["task"]["timeout"] == 5.0


async def test_tasks_without_an_id_get_one_each(client: Client) -> None:
    answers = await bulk(client, [{"name": "n", "command": "true"}] * 3)

    ids = {answer["task"]["id"] for answer in answers}
    assert len(ids) == 3 and all(answer["status"] == 201 for answer in answers)


async def test_more_tasks_than_the_limit_are_refused_whole_with_413(client: Client) -> None:
    tasks = [spec(f"t{n}") for n in range(MAX_BULK_TASKS + 1)]

    async with state_unchanged(client):
        response = await client.post("/bulk/tasks", json={"tasks": tasks})

    assert_problem(response, 413, f"At most {MAX_BULK_TASKS} tasks", "nothing was created")


async def test_the_limit_itself_is_accepted(client: Client) -> None:
    answers = await bulk(client, [spec(f"t{n:04}") for n in range(MAX_BULK_TASKS)])

    assert [answer["status"] for answer in answers] == [201] * MAX_BULK_TASKS
    page = (await client.get("/tasks", params={"limit": MAX_BULK_TASKS})).json()
    assert len(page) == MAX_BULK_TASKS


@pytest.mark.parametrize(
    ("body", "mentioned"),
    [
        pytest.param({"tasks": []}, "length >= 1", id="empty"),
        pytest.param({"tasks": {"name": "n"}}, "Expected `array`", id="not-a-list"),
        pytest.param({"task": [task_spec()]}, "task", id="unknown-field"),
        pytest.param([task_spec()], "Expected `object`", id="a-bare-list"),
    ],
)
async def test_a_body_that_is_not_a_list_of_tasks_is_refused_whole(
    client: Client, body: object, mentioned: str
) -> None:
    async with state_unchanged(client):
        response = await client.post("/bulk/tasks", json=body)

    assert_problem(response, 400, mentioned)


async def test_a_task_due_now_is_pending_with_its_schedule_entry(served: Served) -> None:
    client, store = served

    [answer] = await bulk(client, [spec("due", scheduled_at="2020-01-01T00:00:00Z")])

    assert answer["task"]["status"] == "pending"
    claims = await store.claim_due(now=time.time(), limit=10, lease=30, token="t")
    assert [claim.task_id for claim in claims] == ["due"]


async def test_a_task_with_id_bulk_stays_reachable(client: Client) -> None:
    await create_task(client, id="bulk")

    assert (await client.get("/tasks/bulk")).status_code == 200
    assert (await client.delete("/tasks/bulk")).status_code == 204


async def test_a_body_that_is_not_utf8_is_refused_whole(client: Client) -> None:
    body = b'{"tasks": [{"name": "\xff", "command": "true"}]}'

    async with state_unchanged(client):
        response = await client.post(
            "/bulk/tasks", content=body, headers={"content-type": "application/json"}
        )

    assert_problem(response, 400, "not JSON")

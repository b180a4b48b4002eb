"""Worker pools in the API: a task's ``queue`` (create, update, bulk, GET, the list
filter) and what ``/health`` says about each queue in use.

On the memory store under asyncio and trio, and on Redis (``served`` in conftest.py).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.adapters import open_broker
from app.adapters.memory_broker import MemoryBroker
from app.api import create_app
from app.domain import DEFAULT_QUEUE
from app.pools import pool_stats
from app.ports import Dispatch
from app.service import TaskService
from tests.api.conftest import Served
from tests.api.test_api import assert_problem, create_task, execute, get_task, state_unchanged

Client = httpx.AsyncClient
Json = dict[str, Any]

BAD_NAMES = ["", "a b", "a/b", "é", "x" * 65, "a\n", 5, None]


async def test_a_task_goes_to_the_default_queue_unless_it_names_one(client: Client) -> None:
    assert (await create_task(client, id="plain"))["queue"] == DEFAULT_QUEUE
    named = await create_task(client, id="built", queue="build.x-1_Y")
    assert named["queue"] == "build.x-1_Y"
    assert (await get_task(client, "built"))["queue"] == "build.x-1_Y"


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_a_bad_queue_name_is_refused_and_nothing_is_stored(
    client: Client, name: object
) -> None:
    await create_task(client, id="kept")
    async with state_unchanged(client):
        created = await client.post(
            "/tasks", json={"id": "t2", "name": "n", "command": "true", "queue": name}
        )
        assert_problem(created, 400, "queue")
        updated = await client.put("/tasks/kept", json={"queue": name})
        assert_problem(updated, 400, "queue")
        [answer] = (
            await client.post(
                "/bulk/tasks", json={"tasks": [{"name": "n", "command": "true", "queue": name}]}
            )
        ).json()
        assert answer["status"] == 400 and "queue" in answer["detail"], answer


async def test_update_moves_an_idle_task_to_another_queue(client: Client) -> None:
    await create_task(client, id="t1")
    response = await client.put("/tasks/t1", json={"queue": "deploy"})
    assert response.status_code == 200, response.text
    assert response.json()["queue"] == "deploy"
    assert (await get_task(client, "t1"))["queue"] == "deploy"


async def test_moving_a_task_that_is_not_there_leaves_no_queue_behind(served: Served) -> None:
    response = await served.client.put("/tasks/none-such", json={"queue": "phantom"})
    assert_problem(response, 404, "none-such")
    assert await served.store.queues_in_use() == []


async def test_a_task_with_a_queued_run_stays_on_its_queue(client: Client) -> None:
    await create_task(client, id="t1", queue="a")
    run = await execute(client, "t1")
    assert run["queue"] == "a"
    async with state_unchanged(client):
        moved = await client.put("/tasks/t1", json={"queue": "b"})
        assert_problem(moved, 409, "queue 'a'", "cancel")
    same = await client.put("/tasks/t1", json={"queue": "a", "name": "renamed"})
    assert same.status_code == 200, same.text


async def test_bulk_create_takes_each_task_s_queue(client: Client) -> None:
    tasks = [
        {"id": "x", "name": "x", "command": "true", "queue": "a"},
        {"id": "y", "name": "y", "command": "true"},
    ]
    answers = (await client.post("/bulk/tasks", json={"tasks": tasks})).json()
    assert [a["task"]["queue"] for a in answers] == ["a", DEFAULT_QUEUE]


async def test_the_list_filters_by_queue_across_pages(client: Client) -> None:
    for number in range(12):
        await create_task(client, id=f"t{number:02d}", queue="a" if number % 3 == 0 else "b")
    assert_problem(await client.get("/tasks", params={"queue": "a b"}), 400, "queue")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"queue": "a", "limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get("/tasks", params=params)
        assert response.status_code == 200, response.text
        assert all(task["queue"] == "a" for task in response.json())
        seen += [task["id"] for task in response.json()]
        cursor = response.headers.get("x-next-cursor")
        if cursor is None:
            break
    assert seen == ["t00", "t03", "t06", "t09"]
    listed = (await client.get("/tasks", params={"queue": "none-such"})).json()
    assert listed == []


async def test_health_shows_each_queue_in_use(served: Served) -> None:
    """The queues named by tasks (and the default one) with their depth and consumers."""
    async with open_broker("memory://") as broker:
        assert isinstance(broker, MemoryBroker)
        app = create_app(
            TaskService(served.store),
            checks={"store": served.store.ping, "broker": broker.ping},
            queue_check=lambda: pool_stats(served.store, broker),
        )
        transport = httpx.ASGITransport(app=app)  # pyright: ignore[reportArgumentType]
        async with httpx.AsyncClient(transport=transport, base_url="http://taskq.test") as client:
            await create_task(client, id="t1", queue="a")
            await broker.publish([Dispatch(task_id="t1", run_id="r1", attempt=1, queue="a")])
            async with broker.consume(prefetch=1, queue="b"):
                health = await client.get("/health")
                assert health.status_code == 200, health.text
                assert health.json()["queues"] == {
                    "a": {"depth": 1, "consumers": 0},
                    "default": {"depth": 0, "consumers": 0},
                }
                await served.store.note_queues(["b"])  # as a consumer of b does
                assert (await client.get("/health")).json()["queues"]["b"] == {
                    "depth": 0,
                    "consumers": 1,
                }


async def test_a_store_remembers_the_queues_in_use(served: Served) -> None:
    store = served.store
    assert await store.queues_in_use() == []
    await store.note_queues(["b", "a"])
    await store.note_queues(["a"])
    assert await store.queues_in_use() == ["a", "b"]

"""``POST /tasks`` made concurrently, while the app is served (its lifespan): the creates
reach the store together, one call for those that arrived while one was in flight, and
each request gets its own answer."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import httpx

import tests.conftest
from app.adapters import open_broker, open_store
from app.api import create_app
from app.ports import TaskChange
from app.service import TaskService
from tests.conftest import delete_keys

MEMORY_URL = "memory://"
REQUESTS = 20
ROUND_TRIP_DELAY = 0.05
"""Seconds each call to the store takes: requests made meanwhile queue for the next."""


async def test_concurrent_creates_are_stored_together_and_answered_each(
    adapter_and_backend: tuple[str, str], prefix: str
) -> None:
    store_url = MEMORY_URL if adapter_and_backend[0] == "memory" else tests.conftest.REDIS_URL
    calls: list[int] = []
    try:
        async with open_store(store_url, prefix=prefix) as store, open_broker(MEMORY_URL) as broker:
            create_each = store.create_each

            async def slow_create_each(changes: Sequence[TaskChange]) -> list[bool]:
                calls.append(len(changes))
                await anyio.sleep(ROUND_TRIP_DELAY)
                return await create_each(changes)

            store.create_each = slow_create_each  # type: ignore[method-assign]
            app = create_app(
                TaskService(store), checks={"store": store.ping, "broker": broker.ping}
            )
            transport = httpx.ASGITransport(app=app)  # pyright: ignore[reportArgumentType]
            statuses: list[int] = []
            async with (
                app.lifespan(),
                httpx.AsyncClient(transport=transport, base_url="http://taskq.test") as client,
            ):

                async def create(task_id: str) -> None:
                    body = {"id": task_id, "name": f"name of {task_id}", "command": "true"}
                    statuses.append((await client.post("/tasks/", json=body)).status_code)

                with anyio.fail_after(10):
                    async with anyio.create_task_group() as group:
                        for n in range(REQUESTS):
                            group.start_soon(create, f"t{n}")
                        group.start_soon(create, "t0")  # the same id again: refused alone
                stored = {f"t{n}": await client.get(f"/tasks/t{n}") for n in range(REQUESTS)}
    finally:
        if adapter_and_backend[0] == "redis":
            await delete_keys(prefix)

    assert sum(calls) == REQUESTS + 1
    assert len(calls) <= 3, f"one call for the first, then the rest together: {calls}"
    assert sorted(statuses) == [201] * REQUESTS + [409]
    for task_id, response in stored.items():
        assert response.status_code == 200
        assert response.json()["name"] == f"name of {task_id}"

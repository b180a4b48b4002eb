"""``HEAD /health`` for load balancers, what a request gets while the store is down,
and what a request that hits a bug gets.

Apps built here around a memory store (under asyncio and trio); the faulty stores are
memory stores with one operation broken, the way an outage or a bug in an adapter would
break it. (tests/e2e/test_outages.py does the same with a real Redis, really killed.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from app.adapters.memory_store import MemoryStore
from app.api import create_app
from app.domain import Task
from app.ports import BrokerUnavailable, Store, StoreUnavailable
from app.service import TaskService

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])

SECRET = "password=hunter2 in an internal message"


class BrokenStore(MemoryStore):
    """A store whose reads fail the way a bug fails: with an unexpected exception."""

    async def get_task(self, task_id: str) -> Task | None:
        raise KeyError(SECRET)


class UnreachableStore(MemoryStore):
    """A store whose reads and pings fail while ``down`` is set, as Redis's do in an
    outage; ``reads`` counts the reads attempted."""

    down = False
    reads = 0

    async def get_task(self, task_id: str) -> Task | None:
        self.reads += 1
        if self.down:
            raise StoreUnavailable("Redis: Error 111 connecting to 127.0.0.1:6379.")
        return await super().get_task(task_id)

    async def ping(self) -> None:
        await anyio.sleep(0.05)  # a round trip takes time
        if self.down:
            raise StoreUnavailable("Redis: Error 111 connecting to 127.0.0.1:6379.")


async def answers() -> None:
    pass


async def refuses() -> None:
    raise BrokerUnavailable("cannot connect to amqp://127.0.0.1:1/: ConnectionRefusedError()")


@asynccontextmanager
async def client_of(
    store: Store, *, broker_check: Callable[[], Awaitable[None]] = answers
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(TaskService(store), checks={"store": store.ping, "broker": broker_check})
    transport = httpx.ASGITransport(app=app)  # pyright: ignore[reportArgumentType]
    async with httpx.AsyncClient(transport=transport, base_url="http://taskq.test") as client:
        yield client


async def test_head_health_answers_like_get_without_a_body() -> None:
    async with client_of(MemoryStore(run_history=10)) as client:
        head = await client.head("/health")
    assert (head.status_code, head.content) == (200, b"")


async def test_head_health_is_503_with_retry_after_when_a_dependency_is_down() -> None:
    async with client_of(MemoryStore(run_history=10), broker_check=refuses) as client:
        get = await client.get("/health")
        head = await client.head("/health")
    assert get.status_code == 503
    assert get.json()["checks"]["broker"]["detail"].startswith("BrokerUnavailable: ")
    assert (head.status_code, head.content) == (503, b"")
    assert head.headers["Retry-After"] == get.headers["Retry-After"]


async def test_an_unexpected_error_is_logged_with_its_traceback_and_answered_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="app.api"):
        async with client_of(BrokenStore(run_history=10)) as client:
            response = await client.get("/tasks/t1")

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status_code": 500, "detail": "Internal Server Error"}
    assert SECRET not in response.text
    [record] = [r for r in caplog.records if r.name == "app.api"]
    assert "GET /tasks/t1" in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError
    assert "in get_task" in caplog.text  # the traceback, down to the failing frame


async def create_then_lose_the_store(client: httpx.AsyncClient, store: UnreachableStore) -> None:
    created = await client.post("/tasks", json={"id": "t1", "name": "n", "command": "true"})
    assert created.status_code == 201
    store.down = True


async def test_while_the_store_is_known_down_requests_get_503_without_trying_it() -> None:
    store = UnreachableStore(run_history=10)
    async with client_of(store) as client:
        await create_then_lose_the_store(client, store)

        found_down = await client.get("/tasks/t1")
        reads = store.reads
        refused = [await client.get("/tasks/t1") for _ in range(5)]
        assert store.reads == reads  # refused at once, not tried

        store.down = False
        # A client that waits as told is served, however many come back at once.
        await anyio.sleep(int(refused[-1].headers["Retry-After"]))
        statuses: list[int] = []

        async def get_task() -> None:
            statuses.append((await client.get("/tasks/t1")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(get_task)

    for response in [found_down, *refused]:
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert "Error 111" in response.json()["detail"]
    assert statuses == [200] * 10


async def test_health_and_the_outage_gate_agree_on_whether_the_store_is_down() -> None:
    store = UnreachableStore(run_history=10)
    async with client_of(store) as client:
        await create_then_lose_the_store(client, store)
        assert (await client.get("/health")).status_code == 503
        refused = await client.get("/tasks/t1")
        assert store.reads == 0  # /health found the store down: not tried

        store.down = False
        assert (await client.get("/health")).status_code == 200
        served = await client.get("/tasks/t1")  # at once, not after Retry-After

    assert refused.status_code == 503
    assert served.status_code == 200

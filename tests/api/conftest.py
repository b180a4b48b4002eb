"""The API driven in process: the real Litestar app over a real ``TaskService`` and store.

``served`` runs each test on the memory store under asyncio and trio, and on Redis (under
the test's key prefix, deleted afterwards); requests go through httpx's ASGI transport on
the test's own event loop. The app is open unless a module overrides ``api_tokens``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import NamedTuple

import httpx
import pytest

import tests.conftest
from app.adapters import open_broker, open_store
from app.api import create_app
from app.domain import Outcome, finish_run, start_run, utcnow
from app.ports import Store, TaskChange
from app.service import TaskService
from tests.conftest import delete_keys
from tests.store_cases import adapter_and_backend_fixture, anyio_backend_fixture  # noqa: F401

MEMORY_URL = "memory://"


class Served(NamedTuple):
    client: httpx.AsyncClient
    store: Store


async def refuse_server_errors(response: httpx.Response) -> None:
    request = response.request
    assert response.status_code < 500, f"{request.method} {request.url} -> {response.status_code}"


@asynccontextmanager
async def serve_api(
    store_url: str, *, prefix: str, tokens: Sequence[str] = ()
) -> AsyncIterator[Served]:
    """The app over a store at ``store_url`` and the memory broker, with a client on it."""
    async with (
        open_store(store_url, prefix=prefix) as store,
        open_broker(MEMORY_URL) as broker,
    ):
        app = create_app(
            TaskService(store), checks={"store": store.ping, "broker": broker.ping}, tokens=tokens
        )
        transport = httpx.ASGITransport(app=app)  # pyright: ignore[reportArgumentType]
        # The app's lifespan, as its server runs it (concurrent creates go together).
        async with (
            app.lifespan(),
            httpx.AsyncClient(transport=transport, base_url="http://taskq.test") as client,
        ):
            yield Served(client, store)


@pytest.fixture
def api_tokens() -> Sequence[str]:
    """The tokens the served app requires (none: an open API)."""
    return ()


@pytest.fixture
async def served(
    adapter_and_backend: tuple[str, str], prefix: str, api_tokens: Sequence[str]
) -> AsyncIterator[Served]:
    adapter = adapter_and_backend[0]
    store_url = MEMORY_URL if adapter == "memory" else tests.conftest.REDIS_URL
    try:
        async with serve_api(store_url, prefix=prefix, tokens=api_tokens) as served:
            served.client.event_hooks = {"response": [refuse_server_errors]}
            yield served
    finally:
        if adapter == "redis":
            await delete_keys(prefix)


@pytest.fixture
def client(served: Served) -> httpx.AsyncClient:
    return served.client


@pytest.fixture
def finish_active_run(served: Served) -> Callable[[str], Awaitable[None]]:
    """Play a worker's part: start the task's queued run and record a successful exit."""

    async def finish(task_id: str) -> None:
        store = served.store
        task = await store.get_task(task_id)
        assert task is not None and task.active_run is not None
        run = await store.get_run(task_id, task.active_run.run_id)
        assert run is not None
        started = start_run(task, run, "test-worker", utcnow(), lease_until=utcnow())
        await store.commit(TaskChange.of(started))
        outcome = Outcome(exit_code=0, duration=0.01, output="hello\n", truncated=False)
        await store.commit(TaskChange.of(finish_run(started.task, started.run, outcome, utcnow())))

    return finish

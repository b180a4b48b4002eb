"""Fixtures of the store contract suites: each test runs on the memory store (asyncio and
trio), on Redis (under the test's own key prefix, deleted afterwards) and on a Redis
Cluster started for the session (``redis-cluster``: under the test's prefix, hash-tagged)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import cast

import pytest

import tests.conftest
from app.adapters import open_store
from app.adapters.memory_store import MemoryStore
from app.ports import Store
from tests.conftest import STORE_CASES, delete_keys
from tests.contract.stores import RUN_HISTORY, StoreOpener
from tests.e2e.redis_cluster_servers import RedisClusterSet, cluster_for_session
from tests.store_cases import anyio_backend_fixture  # noqa: F401


@pytest.fixture(
    params=[*STORE_CASES, pytest.param(("redis-cluster", "uvloop"), id="redis-cluster")],
    name="adapter_and_backend",
)
def adapter_and_backend_fixture(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterSet]:
    """A Redis Cluster of the session's own (each test has its own prefix there)."""
    with cluster_for_session() as cluster:
        yield cluster


@pytest.fixture
def adapter(adapter_and_backend: tuple[str, str]) -> str:
    return adapter_and_backend[0]


@pytest.fixture
async def open_configured(
    adapter: str, prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[StoreOpener]:
    """Opens a store of the test's adapter with the given ``open_store`` options (the
    memory store: a new one each time; Redis: on the test's keys)."""
    if adapter == "redis-cluster":
        url = cast(RedisClusterSet, request.getfixturevalue("redis_cluster")).url
    else:
        url = "memory://" if adapter == "memory" else tests.conftest.REDIS_URL

    def opener(**options: float) -> AbstractAsyncContextManager[Store]:
        return open_store(url, prefix=prefix, run_history=RUN_HISTORY, **options)  # type: ignore[arg-type]

    yield opener
    if adapter == "redis":
        await delete_keys(prefix)


@pytest.fixture
def open_another(adapter: str, open_configured: StoreOpener) -> StoreOpener:
    """Opens a second handle on the same data (another process, for Redis)."""
    if adapter != "memory":
        return open_configured
    shared = MemoryStore(run_history=RUN_HISTORY)

    @asynccontextmanager
    async def same_memory(**_: float) -> AsyncIterator[Store]:
        yield shared

    return same_memory


@pytest.fixture
async def store(open_another: StoreOpener) -> AsyncIterator[Store]:
    async with open_another() as opened:
        yield opened

"""Fixtures of the store contract suites: each test runs on the memory store (asyncio and
trio) and on Redis (under the test's own key prefix, deleted afterwards)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

import tests.conftest
from app.adapters import open_store
from app.adapters.memory_store import MemoryStore
from app.ports import Store
from tests.conftest import delete_keys
from tests.contract.stores import RUN_HISTORY, StoreOpener
from tests.store_cases import adapter_and_backend_fixture, anyio_backend_fixture  # noqa: F401


@pytest.fixture
def adapter(adapter_and_backend: tuple[str, str]) -> str:
    return adapter_and_backend[0]


@pytest.fixture
async def open_configured(adapter: str, prefix: str) -> AsyncIterator[StoreOpener]:
    """Opens a store of the test's adapter with the given ``open_store`` options (the
    memory store: a new one each time; Redis: on the test's keys)."""

    def opener(**options: float) -> AbstractAsyncContextManager[Store]:
        url = "memory://" if adapter == "memory" else tests.conftest.REDIS_URL
        return open_store(url, prefix=prefix, run_history=RUN_HISTORY, **options)  # type: ignore[arg-type]

    yield opener
    if adapter == "redis":
        await delete_keys(prefix)


@pytest.fixture
def open_another(adapter: str, open_configured: StoreOpener) -> StoreOpener:
    """Opens a second handle on the same data (another process, for Redis)."""
    if adapter == "redis":
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

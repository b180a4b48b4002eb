"""Unit tests run on both AnyIO backends, over the in-memory adapters."""

from __future__ import annotations

import pytest

from app.adapters.memory_broker import MemoryBroker
from app.adapters.memory_store import MemoryStore


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(run_history=10)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()

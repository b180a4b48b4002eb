"""A Redis store under the test's own key prefix, deleted afterwards."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from app.adapters import open_store
from app.ports import Store
from tests.conftest import REDIS_URL, delete_keys


@pytest.fixture
async def store(prefix: str) -> AsyncGenerator[Store]:
    try:
        async with open_store(REDIS_URL, prefix=prefix, run_history=100) as opened:
            yield opened
    finally:
        await delete_keys(prefix)

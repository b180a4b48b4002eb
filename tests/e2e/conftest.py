from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest
import redis.asyncio as redis

from app.adapters.amqp_broker import delete_amqp_layout
from tests.conftest import AMQP_URL, REDIS_URL, delete_keys


@pytest.fixture
async def servers(prefix: str) -> AsyncGenerator[redis.Redis]:
    """A Redis client for looking at what the processes stored; afterwards, every
    Redis key and AMQP entity under the test's prefix is removed."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
        await delete_keys(prefix)
        await delete_amqp_layout(AMQP_URL, prefix=prefix)

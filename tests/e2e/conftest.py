from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest
import redis.asyncio as redis

import tests.conftest
from app.adapters.amqp_broker import delete_amqp_layout
from tests.conftest import delete_keys


@pytest.fixture
async def servers(prefix: str) -> AsyncGenerator[redis.Redis]:
    """A Redis client for looking at what the processes stored; afterwards, every
    Redis key and AMQP entity under the test's prefix is removed."""
    client = redis.Redis.from_url(tests.conftest.REDIS_URL, decode_responses=True)
    try:
        yield client
    finally:
        # The taskq queues in use have RabbitMQ queues of their own: read them first.
        queues = [str(q) for q in await client.smembers(f"{prefix}queues")]  # type: ignore[misc]
        await client.aclose()
        await delete_keys(prefix)
        await delete_amqp_layout(tests.conftest.AMQP_URL, prefix=prefix, queues=queues)

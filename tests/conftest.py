"""Shared fixtures: real-server URLs and per-test isolation.

Tests that need Redis or RabbitMQ use the real servers (``TASKQ_TEST_REDIS_URL`` /
``TASKQ_TEST_AMQP_URL``, defaulting to the local ones) under a key prefix and queue
names unique to the test, and remove what they created.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable

import anyio
import pytest
import redis.asyncio as redis

REDIS_URL = os.environ.get("TASKQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("TASKQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


# (store adapter, event loop): the memory store on both backends, Redis on asyncio (its client
# needs asyncio). Suites over a store parametrise a fixture with these.
STORE_CASES = [
    pytest.param(("memory", "asyncio"), id="memory-asyncio"),
    pytest.param(("memory", "trio"), id="memory-trio"),
    pytest.param(("redis", "asyncio"), id="redis"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def prefix() -> str:
    """A key prefix / AMQP name prefix no other test uses."""
    return f"taskq-test-{uuid.uuid4().hex[:12]}:"


async def delete_keys(prefix: str) -> None:
    """Remove every Redis key under ``prefix`` (a test's clean-up)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0, every: float = 0.01
) -> None:
    """Wait until ``condition()`` holds, failing after ``within`` seconds.

    For state that nothing notifies a test about (a file another process writes, a
    store another task changes): checked every ``every`` seconds, always bounded.
    """
    with anyio.fail_after(within):
        while True:
            result = condition()
            if result if isinstance(result, bool) else await result:
                return
            await anyio.sleep(every)

"""What ``RedisStore.create_each`` promises beyond the contract: one wake per batch."""

from __future__ import annotations

import time

import anyio
import redis.asyncio as redis

import tests.conftest
from app.adapters import open_store
from app.domain import TaskStatus
from tests.conftest import delete_keys
from tests.contract.test_task_store_contract import creation


async def test_a_batch_of_ever_earlier_tasks_wakes_schedulers_once(prefix: str) -> None:
    """Each task is earlier than every entry before it: committed one by one, each would
    publish a wake (and every scheduler would look at the schedule that many times)."""
    listener = redis.Redis.from_url(tests.conftest.REDIS_URL)
    pubsub = listener.pubsub()  # pyright: ignore[reportUnknownMemberType]
    try:
        await pubsub.subscribe(f"{prefix}wake")
        async with open_store(tests.conftest.REDIS_URL, prefix=prefix) as store:
            now = time.time()
            changes = [
                creation(f"t{n}", due=now + 60 - n, status=TaskStatus.PENDING) for n in range(5)
            ]
            assert await store.create_each(changes) == [True] * 5
            await store.create_each([creation("later", due=now + 3600)])

        wakes: list[bytes] = []
        with anyio.move_on_after(0.5):  # every publish has arrived by then
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    wakes.append(message["data"])
        assert wakes == [repr(now + 60 - 4).encode()]
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await delete_keys(prefix)

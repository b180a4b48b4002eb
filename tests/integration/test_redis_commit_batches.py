"""``commit_each`` on Redis: one round trip per batch (no ``SCRIPT EXISTS`` before it), and
a batch sent after Redis lost its scripts still commits. On a Redis server of its own,
whose scripts and command counts no other test touches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from app.adapters import open_store
from app.ports import Store, TaskChange
from tests.contract.stores import create, make_task, next_revision
from tests.e2e.servers import throwaway_redis


@pytest.fixture
async def server_client(tmp_path: Path) -> AsyncIterator[tuple[Store, redis.Redis]]:
    async with (
        throwaway_redis(tmp_path, appendonly=False) as server,
        open_store(server.url, prefix="t:", run_history=10) as store,
    ):
        client = redis.Redis.from_url(server.url)
        try:
            yield store, client
        finally:
            await client.aclose()


async def script_calls(client: redis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name: stat["calls"] for name, stat in stats.items() if "script" in name}


async def test_a_batch_of_commits_asks_nothing_about_scripts_first(
    server_client: tuple[Store, redis.Redis],
) -> None:
    store, client = server_client
    task = await create(store, "a")
    before = await script_calls(client)
    for round_ in range(3):
        changes = [
            TaskChange(f"new-{round_}-{n}", None, make_task(f"new-{round_}-{n}")) for n in range(5)
        ]
        assert await store.commit_each(changes) == [True] * 5
    assert await store.commit_each([TaskChange("a", task.revision, next_revision(task))]) == [True]
    assert await script_calls(client) == before


async def test_a_batch_sent_after_redis_lost_its_scripts_commits(
    server_client: tuple[Store, redis.Redis],
) -> None:
    store, client = server_client
    task = await create(store, "a")
    await client.script_flush()
    renamed = next_revision(task, name="renamed")
    applied = await store.commit_each(
        [
            TaskChange("a", task.revision, renamed),
            TaskChange("b", None, make_task("b")),
            TaskChange("a", task.revision + 5, next_revision(task, name="stale")),
        ]
    )
    assert applied == [True, True, False]
    assert await store.get_task("a") == renamed
    assert await store.get_task("b") is not None

"""A stored task the scheduler cannot plan (its next fire cannot be computed) is set
aside on its own: it is unscheduled with a run saying why, and the rest of the batch
fires. Written straight into each store, as an older version or a hand edit may have."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import redis.asyncio as redis

from app.adapters import open_store
from app.adapters.memory_broker import MemoryBroker
from app.adapters.memory_store import MemoryStore
from app.domain import Recurrence, RunStatus, Task, TaskStatus, timestamp, utcnow
from app.ports import Dispatch, DueAt, Store, TaskChange
from app.scheduler import Scheduler
from tests.conftest import REDIS_URL, delete_keys

UNPLANNABLE = {
    # The calendar ends in year 9999: the fire after 9999-12-31T23:59 does not exist.
    "edge-of-calendar": Recurrence(
        cron="* * * * *", start=datetime(9999, 12, 31, 23, 59, tzinfo=UTC)
    ),
    # A directory of the zone database, not a zone.
    "no-such-zone": Recurrence(cron="* * * * *", timezone="Europe"),
}


@asynccontextmanager
async def opened(adapter: str, prefix: str) -> AsyncIterator[Store]:
    if adapter == "memory":
        yield MemoryStore(run_history=10)
        return
    try:
        async with open_store(REDIS_URL, prefix=prefix, run_history=10) as store:
            yield store
    finally:
        await delete_keys(prefix)


async def store_due(store: Store, task_id: str, schedule: Recurrence | None) -> None:
    now = utcnow()
    due = now - timedelta(seconds=1)
    task = Task(
        id=task_id,
        name=task_id,
        command="true",
        created_at=now,
        updated_at=now,
        scheduled_at=due,
        schedule=schedule,
        next_runs=[due],
    )
    await store.commit(TaskChange(task_id, None, task, schedule=DueAt(timestamp(due))))


@pytest.mark.parametrize("adapter", ["memory", "redis"])
async def test_a_task_whose_next_fire_cannot_be_computed_is_set_aside_and_the_rest_fire(
    adapter: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(adapter, prefix) as store:
        await check_unplannable_tasks_are_set_aside(store, caplog)


async def check_unplannable_tasks_are_set_aside(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    await store_due(store, "good-once", None)
    for task_id, recurrence in UNPLANNABLE.items():
        await store_due(store, task_id, recurrence)
    await store_due(store, "good-every-minute", Recurrence(every=60, start=utcnow()))
    scheduler = Scheduler(store, broker, lease_seconds=30)

    with caplog.at_level(logging.ERROR, logger="app.scheduler"):
        assert await scheduler.dispatch_due() == 4

    published = [msgspec.json.decode(body, type=Dispatch).task_id for body in broker.queue]
    assert sorted(published) == ["good-every-minute", "good-once"]
    for task_id in UNPLANNABLE:
        task = await store.get_task(task_id)
        assert task is not None and task.status == TaskStatus.CREATED
        assert (task.schedule, task.scheduled_at, task.next_runs) == (None, None, [])
        [run] = (await store.list_runs(task_id, limit=10)).runs
        assert run.status == RunStatus.SKIPPED and run.error is not None
        assert "could not be planned" in run.error
        [record] = [r for r in caplog.records if task_id in r.getMessage()]
        assert record.exc_info is not None, "logged with its traceback"
    assert "OverflowError" in str(
        (await store.list_runs("edge-of-calendar", limit=1)).runs[0].error
    )
    # Set aside for good: no entry of theirs is left (the good ones wait for their runs).
    later = timestamp(utcnow() + timedelta(hours=1))
    assert await store.claim_due(now=later, limit=10, lease=1, token="t") == []


async def test_a_task_document_that_cannot_be_read_does_not_stop_the_scheduler(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis only: the memory store holds objects, so it has no unreadable documents."""
    async with opened("redis", prefix) as store:
        await store_due(store, "good-once", None)
        client = redis.Redis.from_url(REDIS_URL)
        try:
            broken = b'{"id": "broken", "name": 5'
            await client.set(f"{prefix}task:broken", broken)
            await client.zadd(f"{prefix}tasks", {"broken": 0})
            await client.zadd(f"{prefix}scheduled_tasks", {"broken": timestamp(utcnow()) - 1})
            broker = MemoryBroker()
            scheduler = Scheduler(store, broker, lease_seconds=30)

            with caplog.at_level(logging.ERROR, logger="app.adapters.redis_store"):
                assert await scheduler.dispatch_due() == 2

            published = [msgspec.json.decode(body, type=Dispatch).task_id for body in broker.queue]
            assert published == ["good-once"]
            assert await client.get(f"{prefix}task:broken") == broken, "the document is kept"
            assert await client.zscore(f"{prefix}scheduled_tasks", "broken") is None
            [record] = [r for r in caplog.records if "'broken'" in r.getMessage()]
            assert record.exc_info is not None, "logged with its traceback"
        finally:
            await client.aclose()

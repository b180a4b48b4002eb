"""Deleting a task whose stored document cannot be read, through ``TaskService.delete``
(what ``DELETE /tasks/{id}`` and ``taskq delete`` do): everything a delete removes goes,
and a document changed between its read and the delete is read again, never deleted
unseen."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, cast

import msgspec
import pytest
import redis.asyncio as redis

import tests.conftest
from app.adapters import open_store
from app.adapters.memory_store import MemoryStore
from app.domain import (
    Notify,
    Outcome,
    TaskNotFound,
    UnreadableTask,
    finish_run,
    queue_run,
    start_run,
    utcnow,
)
from app.events import Event, EventType
from app.ports import DueAt, Store, TaskChange
from app.service import TaskService
from tests.conftest import delete_keys
from tests.contract.stores import make_task
from tests.contract.test_unreadable_tasks_contract import SPOILED, spoil, stored_document


@asynccontextmanager
async def opened(adapter: str, prefix: str) -> AsyncIterator[Store]:
    if adapter == "memory":
        yield MemoryStore(run_history=10)
        return
    try:
        async with open_store(tests.conftest.REDIS_URL, prefix=prefix, run_history=10) as store:
            yield store
    finally:
        await delete_keys(prefix)


async def with_history(store: Store, task_id: str) -> list[str]:
    """A task with a finished run and a running one (each with its notification
    records), and an entry in ``scheduled_tasks``; the ids of its runs."""
    now = utcnow()
    task = make_task(task_id, notify=Notify(on_start="https://hooks.example/start"))
    await store.commit(TaskChange(task_id, None, task))
    run_ids: list[str] = []
    for _ in range(2):
        queued = queue_run(task, now)
        await store.commit(TaskChange.of(queued))
        started = start_run(queued.task, queued.run, "w", now, lease_until=now)
        await store.commit(TaskChange.of(started))
        task, run = started.task, started.run
        run_ids.append(run.run_id)
        if len(run_ids) == 1:
            outcome = Outcome(exit_code=0, duration=0.1, output="hi\n", truncated=False)
            finished = finish_run(task, run, outcome, now)
            await store.commit(TaskChange.of(finished))
            task = finished.task
    return run_ids


@pytest.mark.parametrize("adapter", ["memory", "redis"])
async def test_deleting_it_tells_its_runs_to_stop(adapter: str, prefix: str) -> None:
    async with opened(adapter, prefix) as store:
        run_ids = await with_history(store, "bad")
        await spoil(store, "bad")
        async with store.cancel_notices() as notices:
            await TaskService(store).delete("bad")
            # Which run is active cannot be read: every one is told (one that ended
            # has nothing to stop).
            assert sorted([await anext(notices), await anext(notices)]) == sorted(run_ids)
        with pytest.raises(TaskNotFound):
            await TaskService(store).get("bad")


async def test_deleting_it_leaves_no_key_a_delete_would_not(prefix: str) -> None:
    """Side by side on Redis: a task deleted as usual, and the same history deleted with
    its document spoiled. Neither leaves a key or an index entry behind."""
    client = redis.Redis.from_url(tests.conftest.REDIS_URL)
    try:
        async with opened("redis", prefix) as store:
            await store.create_each([TaskChange("other", None, make_task("other"))])
            before = await keys_and_members(client, prefix)
            runs = {task_id: await with_history(store, task_id) for task_id in ("same", "bad")}
            due = utcnow() + timedelta(hours=1)
            for task_id in runs:  # an entry of its own in scheduled_tasks and claims
                await client.zadd(f"{prefix}scheduled_tasks", {task_id: due.timestamp()})
                await client.hset(f"{prefix}claims", task_id, "token")  # type: ignore[misc]
            for run_id in (run for ids in runs.values() for run in ids):
                assert await client.exists(f"{prefix}notifications:{run_id}")
            await spoil(store, "bad")
            service = TaskService(store)

            await service.delete("same")
            await service.delete("bad")

            after = await keys_and_members(client, prefix)
            # The outbox keeps a pending notification until a notifier finds its run
            # gone (as for any delete): the same for both.
            outbox = [after.pop(f"{prefix}{key}") for key in ("notify_due", "notify_entries")]
            assert after == before
            for members in outbox:
                assert isinstance(members, list)
                ids = [member.decode().split("/")[0] for member in cast(list[bytes], members)]
                assert sorted(ids) == ["bad", "bad", "same", "same"]
            assert await store.get_task("other") is not None
            tail = await store.read_events(None, limit=1000)
            assert [(e.type, e.task_id) for e in tail.events[-2:]] == [
                (EventType.TASK_DELETED, "same"),
                (EventType.TASK_DELETED, "bad"),
            ]
    finally:
        await client.aclose()


async def keys_and_members(client: redis.Redis, prefix: str) -> dict[str, object]:
    """Every key under ``prefix`` but the event log, with its members where it has any
    (the indexes, ``scheduled_tasks``, ``claims``)."""
    found: dict[str, object] = {}
    async for raw in client.scan_iter(match=f"{prefix}*", count=1000):
        key = raw.decode()
        kind = cast(bytes, await client.type(key)).decode()
        if kind == "zset":
            found[key] = sorted(await client.zrange(key, 0, -1))
        elif kind == "hash":
            found[key] = sorted(await client.hkeys(key))  # type: ignore[misc]
        elif kind != "stream":
            found[key] = kind
    return found


class ChangedBeforeTheDelete:
    """A store whose task document is changed (by ``change``) just before the first
    ``delete_unreadable``: what another client may do between the read and the delete."""

    def __init__(self, store: Store, change: Any) -> None:
        self._store = store
        self._change = change

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def delete_unreadable(
        self, task_id: str, document: bytes, *, events: Sequence[Event]
    ) -> list[str] | None:
        if self._change is not None:
            change, self._change = self._change, None
            await change(self._store)
        return await self._store.delete_unreadable(task_id, document, events=events)


@pytest.mark.parametrize("adapter", ["memory", "redis"])
async def test_a_document_changed_before_the_delete_is_read_again(
    adapter: str, prefix: str
) -> None:
    async with opened(adapter, prefix) as store:
        await store.commit(TaskChange("bad", None, make_task("bad")))
        await spoil(store, "bad")

        async def spoil_again(store: Store) -> None:
            await spoil(store, "bad", b"spoiled again")

        await TaskService(cast(Store, ChangedBeforeTheDelete(store, spoil_again))).delete("bad")

        assert await stored_document(store, "bad") is None


@pytest.mark.parametrize("adapter", ["memory", "redis"])
async def test_a_document_repaired_before_the_delete_is_deleted_as_a_task(
    adapter: str, prefix: str
) -> None:
    async with opened(adapter, prefix) as store:
        task = make_task("bad")
        await store.commit(TaskChange("bad", None, task))
        await spoil(store, "bad")

        async def repair(store: Store) -> None:
            await spoil(store, "bad", msgspec.json.encode(task))

        service = TaskService(cast(Store, ChangedBeforeTheDelete(store, repair)))
        await service.delete("bad")

        assert await stored_document(store, "bad") is None
        [event] = (await store.read_events(None, limit=10)).events
        assert (event.type, event.task_id) == (EventType.TASK_DELETED, "bad")


@pytest.mark.parametrize("adapter", ["memory", "redis"])
async def test_a_document_deleted_before_the_delete_is_not_found(adapter: str, prefix: str) -> None:
    async with opened(adapter, prefix) as store:
        task = make_task("bad")
        await store.commit(TaskChange("bad", None, task, schedule=DueAt(0.0)))
        await spoil(store, "bad")

        async def delete_it(store: Store) -> None:
            assert await store.delete_unreadable("bad", SPOILED, events=()) is not None

        service = TaskService(cast(Store, ChangedBeforeTheDelete(store, delete_it)))
        with pytest.raises(TaskNotFound):
            await service.delete("bad")


@pytest.mark.parametrize("adapter", ["memory", "redis"])
async def test_no_other_change_touches_it(adapter: str, prefix: str) -> None:
    async with opened(adapter, prefix) as store:
        await store.commit(TaskChange("bad", None, make_task("bad")))
        await spoil(store, "bad")
        service = TaskService(store)

        for change in (service.execute, service.cancel, service.pause, service.resume):
            with pytest.raises(UnreadableTask):
                await change("bad")
        with pytest.raises(UnreadableTask):
            await service.unschedule("bad")

        assert await stored_document(store, "bad") == SPOILED
        assert (await service.runs("bad", limit=10)).runs == [], "its runs can be read"

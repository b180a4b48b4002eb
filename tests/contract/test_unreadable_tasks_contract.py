"""A stored task document that cannot be read (a hand edit in Redis, another version's
format), one suite for every adapter: it is neither a task nor gone. A read of that one
task says so, a read of many goes on without it, and nothing but ``delete_unreadable``
changes it."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import cast

import msgspec
import pytest

from app.adapters.memory_store import MemoryStore
from app.adapters.redis_store import RedisStore
from app.domain import RevisionConflict, TaskAlreadyExists, TaskStatus, UnreadableTask, utcnow
from app.events import EventType, task_deleted
from app.ports import DueAt, Store, TaskChange
from tests.contract.stores import create, make_task, next_revision, running_run

SPOILED = b'{"id":"bad","oops'
"""What the defect's report wrote over a task's document (JSON cut short)."""


async def spoil(store: Store, task_id: str, document: bytes = SPOILED) -> None:
    """Write ``document`` over the stored document of ``task_id``, behind the store's
    back, as a hand edit in Redis does."""
    if isinstance(store, MemoryStore):
        store._tasks[task_id] = document  # pyright: ignore[reportPrivateUsage]
    else:
        assert isinstance(store, RedisStore)
        await store._redis.set(store.task_key(task_id), document)  # pyright: ignore[reportPrivateUsage]


async def stored_document(store: Store, task_id: str) -> bytes | None:
    """The bytes stored for ``task_id``, read behind the store's back."""
    if isinstance(store, MemoryStore):
        return store._tasks.get(task_id)  # pyright: ignore[reportPrivateUsage]
    assert isinstance(store, RedisStore)
    stored = await store._redis.get(store.task_key(task_id))  # pyright: ignore[reportPrivateUsage]
    return cast(bytes | None, stored)


async def test_reading_the_task_says_its_document_cannot_be_read(store: Store) -> None:
    await create(store, "bad")
    await spoil(store, "bad")

    with pytest.raises(UnreadableTask) as raised:
        await store.get_task("bad")
    assert (raised.value.task_id, raised.value.document) == ("bad", SPOILED)
    assert "'bad'" in str(raised.value) and "cannot be read" in str(raised.value)
    assert raised.value.reason, "what is wrong with it, for the logs"
    with pytest.raises(UnreadableTask):
        await store.get_task_and_run("bad", "some-run")


async def test_reads_of_many_tasks_go_on_without_it_and_name_it_in_a_warning(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    good = await create(store, "good")
    await create(store, "bad")
    await spoil(store, "bad")

    with caplog.at_level(logging.WARNING):
        assert await store.get_tasks(["good", "bad", "gone"]) == [good, None, None]
    [warning] = [r for r in caplog.records if "'bad'" in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert await store.get_tasks_and_runs([("good", "r"), ("bad", "r")]) == [
        (good, None),
        (None, None),
    ]
    reads, applied = await store.read_and_commit_each([("bad", "r")], [])
    assert (reads, applied) == ([(None, None)], [])


async def test_a_change_conflicts_with_it_and_changes_nothing(store: Store) -> None:
    task = await create(store, "bad")
    await spoil(store, "bad")

    with pytest.raises(RevisionConflict):
        await store.commit(TaskChange("bad", task.revision, next_revision(task, name="x")))
    with pytest.raises(RevisionConflict):
        await store.commit(TaskChange("bad", task.revision, None))
    with pytest.raises(TaskAlreadyExists):
        await store.commit(TaskChange("bad", None, make_task("bad")))
    changes = [TaskChange("bad", task.revision, next_revision(task, name="y"))]
    assert await store.commit_each(changes) == [False]
    assert await store.create_each([TaskChange("bad", None, make_task("bad"))]) == [False]
    assert await stored_document(store, "bad") == SPOILED
    page = await store.list_tasks(status=TaskStatus.CREATED, limit=10, after=None)
    assert page.unreadable == ["bad"], "still in its status's index"


async def test_a_due_entry_of_it_is_claimed_as_a_task_that_is_gone(store: Store) -> None:
    due = utcnow() - timedelta(seconds=1)
    task = make_task("bad", status=TaskStatus.PENDING, scheduled_at=due)
    await store.commit(TaskChange("bad", None, task, schedule=DueAt(due.timestamp())))
    await spoil(store, "bad")

    [entry] = await store.scheduled_entries(until=utcnow().timestamp(), offset=0, limit=10)
    assert (entry.task_id, entry.task) == ("bad", None)
    [claim] = await store.claim_due(now=utcnow().timestamp(), limit=10, lease=30, token="t")
    assert (claim.task_id, claim.task) == ("bad", None)
    assert await stored_document(store, "bad") == SPOILED, "left as it is"


async def pages(store: Store, *, limit: int, status: TaskStatus | None = None) -> list[object]:
    """Every page of a listing, each as (task ids, unreadable ids, after)."""
    found: list[object] = []
    after = None
    while True:
        page = await store.list_tasks(status=status, limit=limit, after=after)
        found.append(([t.id for t in page.tasks], list(page.unreadable), page.after))
        if page.after is None:
            return found
        after = page.after


@pytest.mark.parametrize("status", [None, TaskStatus.CREATED])
async def test_a_listing_pages_past_it_and_names_it(
    store: Store, status: TaskStatus | None
) -> None:
    for task_id in ("a", "b", "c", "d", "e"):
        await create(store, task_id)
    await spoil(store, "c")

    assert await pages(store, limit=2, status=status) == [
        (["a", "b"], [], "b"),
        (["d"], ["c"], "d"),  # short: it read c, which is no task
        (["e"], [], None),
    ]
    # A page that ends with it, and one that holds nothing else.
    assert await pages(store, limit=3, status=status) == [
        (["a", "b"], ["c"], "c"),
        (["d", "e"], [], None),
    ]
    page = await store.list_tasks(status=status, limit=1, after="b")
    assert (list(page.tasks), list(page.unreadable), page.after) == ([], ["c"], "c")


async def test_a_listing_counts_a_task_deleted_as_it_reads(store: Store) -> None:
    """What it read of the index decides where the next page starts, not the tasks it
    found: a page that found fewer still says that more follow."""
    for task_id in ("a", "b", "c"):
        await create(store, task_id)
    assert (await store.list_tasks(status=None, limit=2, after=None)).after == "b"
    assert (await store.list_tasks(status=None, limit=3, after=None)).after is None


async def test_deleting_it_takes_what_a_delete_takes(store: Store) -> None:
    task, run = await running_run(store, "bad")
    due = utcnow() + timedelta(hours=1)
    await store.commit(
        TaskChange("bad", task.revision, next_revision(task), schedule=DueAt(due.timestamp()))
    )
    await create(store, "good")
    await spoil(store, "bad")
    newest = (await store.read_events(None, limit=1000)).events[-1].id
    events = [task_deleted("bad", utcnow())]

    assert await store.delete_unreadable("bad", SPOILED, events=events) == [run.run_id]

    assert await store.get_task("bad") is None
    assert (await store.list_runs("bad", limit=10)).runs == []
    for status in (None, *TaskStatus):
        page = await store.list_tasks(status=status, limit=10, after=None)
        assert "bad" not in [*page.unreadable, *(t.id for t in page.tasks)]
    later = (utcnow() + timedelta(days=1)).timestamp()
    assert await store.scheduled_entries(until=later, offset=0, limit=10) == []
    assert await store.busy_tasks(limit=10) == []
    [deleted] = (await store.read_events(newest, limit=10)).events
    assert (deleted.type, deleted.task_id) == (EventType.TASK_DELETED, "bad")
    assert await store.get_task("good") is not None
    assert await store.delete_unreadable("bad", SPOILED, events=events) is None, "gone"


async def test_it_is_not_deleted_once_its_document_changed(store: Store) -> None:
    await create(store, "bad")
    await spoil(store, "bad")
    await spoil(store, "bad", b"written again")
    events = [task_deleted("bad", utcnow())]

    assert await store.delete_unreadable("bad", SPOILED, events=events) is None

    assert await stored_document(store, "bad") == b"written again"
    page = await store.list_tasks(status=TaskStatus.CREATED, limit=10, after=None)
    assert page.unreadable == ["bad"]
    logged = (await store.read_events(None, limit=1000)).events
    assert EventType.TASK_DELETED not in [event.type for event in logged]
    # Nor once it was written again as a task that can be read.
    await spoil(store, "bad", msgspec.json.encode(make_task("bad")))
    assert await store.delete_unreadable("bad", b"written again", events=events) is None
    assert await store.get_task("bad") is not None

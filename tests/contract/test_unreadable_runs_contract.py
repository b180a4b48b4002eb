"""A stored run document that cannot be read (a hand edit in Redis, another version's
format), one suite for every adapter: it is neither a run nor gone. A read of that one
run says so, a listing of runs leaves it out and names it, and a batch read goes on
without it."""

from __future__ import annotations

import logging

import anyio
import pytest

from app.adapters.memory_store import MemoryStore
from app.adapters.redis_store import RedisStore
from app.domain import Run, Task, TaskStatus, UnreadableRun, UnreadableTask, queue_run, utcnow
from app.ports import Store, TaskChange
from tests.contract.stores import create, next_revision, unpack
from tests.contract.test_unreadable_tasks_contract import spoil

SPOILED_RUN = b'{"run_id":"r","oops'
"""What a hand edit wrote over a run's document (JSON cut short)."""


async def spoil_run(store: Store, task_id: str, run_id: str, document: bytes = SPOILED_RUN) -> None:
    """Write ``document`` over the stored document of a run, behind the store's back, as
    a hand edit in Redis does."""
    if isinstance(store, MemoryStore):
        store._runs[task_id][run_id] = document  # pyright: ignore[reportPrivateUsage]
    else:
        assert isinstance(store, RedisStore)
        await store._redis.hset(store.runs_key(task_id), run_id, document)  # type: ignore[misc]  # pyright: ignore[reportPrivateUsage]


async def with_runs(store: Store, task_id: str, count: int) -> tuple[Task, list[Run]]:
    """A task with ``count`` ended runs stored (oldest first); the task as stored."""
    task = await create(store, task_id)
    runs: list[Run] = []
    for _ in range(count):
        pending, run = unpack(queue_run(task, utcnow()))
        idle = next_revision(pending, status=TaskStatus.CREATED, active_run=None)
        await store.commit(TaskChange(task_id, task.revision, idle, runs=[run]))
        task = idle
        runs.append(run)
        await anyio.sleep(0.002)  # run ids order by millisecond
    return task, runs


async def test_reading_the_run_says_its_document_cannot_be_read(store: Store) -> None:
    task, [first, second] = await with_runs(store, "a", 2)
    await spoil_run(store, "a", first.run_id)

    with pytest.raises(UnreadableRun) as raised:
        await store.get_run("a", first.run_id)
    assert (raised.value.task_id, raised.value.run_id) == ("a", first.run_id)
    assert f"run {first.run_id!r} of task 'a'" in str(raised.value)
    assert "cannot be read" in str(raised.value)
    assert raised.value.reason, "what is wrong with it, for the logs"
    with pytest.raises(UnreadableRun):
        await store.get_task_and_run("a", first.run_id)
    # The task and the other runs can be read.
    assert await store.get_run("a", second.run_id) == second
    assert await store.get_task_and_run("a", second.run_id) == (task, second)
    assert await store.get_task("a") == task


async def test_an_unreadable_task_is_said_first(store: Store) -> None:
    _, [run] = await with_runs(store, "a", 1)
    await spoil_run(store, "a", run.run_id)
    await spoil(store, "a")

    with pytest.raises(UnreadableTask):
        await store.get_task_and_run("a", run.run_id)


async def test_a_listing_of_runs_leaves_it_out_and_names_it_in_one_warning(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    _, runs = await with_runs(store, "a", 4)
    oldest, spoiled, readable, newest = runs
    await spoil_run(store, "a", spoiled.run_id)
    await spoil_run(store, "a", oldest.run_id, b"not json at all")

    with caplog.at_level(logging.WARNING):
        history = await store.list_runs("a", limit=10)

    assert list(history.runs) == [newest, readable]
    assert list(history.unreadable) == [spoiled.run_id, oldest.run_id], "newest first"
    [warning] = [r for r in caplog.records if spoiled.run_id in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert oldest.run_id in warning.getMessage() and "'a'" in warning.getMessage()
    # ``limit`` counts the runs read: an unreadable one takes its place.
    history = await store.list_runs("a", limit=3)
    assert (list(history.runs), list(history.unreadable)) == (
        [newest, readable],
        [spoiled.run_id],
    )
    history = await store.list_runs("a", limit=2)
    assert (list(history.runs), list(history.unreadable)) == ([newest, readable], [])


async def test_batch_reads_go_on_without_it_and_name_it_in_a_warning(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    task, [spoiled, readable] = await with_runs(store, "a", 2)
    await spoil_run(store, "a", spoiled.run_id)

    with caplog.at_level(logging.WARNING):
        read = await store.get_tasks_and_runs([("a", spoiled.run_id), ("a", readable.run_id)])
    assert read == [(task, None), (task, readable)]
    [warning] = [r for r in caplog.records if spoiled.run_id in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    reads, applied = await store.read_and_commit_each(
        [("a", spoiled.run_id), ("a", readable.run_id)], []
    )
    assert (reads, applied) == ([(task, None), (task, readable)], [])


async def test_a_commit_writing_the_run_replaces_it(store: Store) -> None:
    task = await create(store, "a")
    pending, run = unpack(queue_run(task, utcnow()))
    await store.commit(TaskChange("a", task.revision, pending, runs=[run]))
    await spoil_run(store, "a", run.run_id)

    renamed = next_revision(pending, name="renamed")
    await store.commit(TaskChange("a", pending.revision, renamed, runs=[run]))

    assert await store.get_run("a", run.run_id) == run

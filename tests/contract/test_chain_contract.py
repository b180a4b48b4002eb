"""Chained tasks in the ``TaskStore``: a run's end and the runs it triggers are one atomic
commit (``TaskChange.chained``), on every adapter: all or none, safe to send again."""

from __future__ import annotations

import pytest

from app.chains import chained_change, change_of
from app.domain import (
    Chain,
    ChainOutcome,
    Outcome,
    OverlapPolicy,
    RevisionConflict,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    Transition,
    TriggeredBy,
    finish_run,
    queue_run,
    start_run,
    utcnow,
)
from app.ports import Store, TaskChange
from app.transactions import transact
from tests.contract.stores import create, make_task, next_revision

OK = Outcome(exit_code=0, duration=0.1, output="", truncated=False)
FAILED = Outcome(exit_code=1, duration=0.1, output="", truncated=False)


async def started(store: Store, task_id: str) -> tuple[Task, Run]:
    """The task's run queued and started, as stored."""
    task = await store.get_task(task_id)
    assert task is not None
    queued = queue_run(task, utcnow())
    await store.commit(TaskChange.of(queued))
    begun = start_run(queued.task, queued.run, "worker", utcnow(), lease_until=utcnow())
    await store.commit(TaskChange.of(begun))
    return begun.task, begun.run


async def end(store: Store, task_id: str, outcome: Outcome) -> Transition:
    """Record the end of the task's running run, as the consumer does."""
    task = await store.get_task(task_id)
    assert task is not None and task.active_run is not None
    run = await store.get_run(task_id, task.active_run.run_id)
    assert run is not None
    return await transact(
        store, task_id, lambda current: finish_run(current, run, outcome, utcnow())
    )


async def runs_of(store: Store, task_id: str) -> list[Run]:
    return list((await store.list_runs(task_id, limit=50)).runs)


async def test_a_success_queues_the_on_success_targets_with_the_end(store: Store) -> None:
    await create(store, "b")
    await create(store, "d")
    await create(store, "a", chain=Chain(on_success=["b"], on_failure=["d"]))
    _, run = await started(store, "a")
    await end(store, "a", OK)

    [ended] = [r for r in await runs_of(store, "a") if r.run_id == run.run_id]
    assert ended.status == RunStatus.COMPLETED
    [queued] = await runs_of(store, "b")
    assert queued.status == RunStatus.QUEUED
    assert queued.triggered_by == TriggeredBy(task_id="a", run_id=run.run_id)
    assert [(t.task_id, t.outcome, t.run_id) for t in ended.triggered] == [
        ("b", ChainOutcome.QUEUED, queued.run_id)
    ]
    b = await store.get_task("b")
    assert b is not None and b.status == TaskStatus.PENDING
    assert b.active_run is not None and b.active_run.run_id == queued.run_id
    assert await store.count_due(now=utcnow().timestamp() + 1) == 1  # b is due: dispatched next
    assert await runs_of(store, "d") == []


async def test_a_failure_with_a_retry_left_triggers_nothing_until_its_last_attempt(
    store: Store,
) -> None:
    await create(store, "b")
    await create(store, "d")
    await create(
        store,
        "a",
        max_attempts=2,
        retry_backoff=0.01,
        chain=Chain(on_success=["b"], on_failure=["d"]),
    )
    await started(store, "a")
    first = await end(store, "a", FAILED)
    assert first.run.triggered == [] and await runs_of(store, "d") == []
    task = await store.get_task("a")
    assert task is not None and task.active_run is not None
    retry = await store.get_run("a", task.active_run.run_id)
    assert retry is not None
    due = retry.not_before
    assert due is not None
    begun = start_run(task, retry, "worker", due, lease_until=due)
    await store.commit(TaskChange.of(begun))
    last = await end(store, "a", FAILED)
    assert [t.outcome for t in last.run.triggered] == [ChainOutcome.QUEUED]
    [queued] = await runs_of(store, "d")
    assert queued.triggered_by == TriggeredBy(task_id="a", run_id=last.run.run_id)
    assert await runs_of(store, "b") == []


async def test_a_stale_target_makes_the_whole_commit_conflict_and_store_nothing(
    store: Store,
) -> None:
    await create(store, "b")
    await create(store, "a", chain=Chain(on_success=["b"]))
    task, run = await started(store, "a")
    planned, targets = await chained_change(store, finish_run(task, run, OK, utcnow()))
    b = await store.get_task("b")
    assert b is not None
    await store.commit(TaskChange("b", b.revision, next_revision(b, name="changed meanwhile")))

    with pytest.raises(RevisionConflict):
        await store.commit(change_of(planned, targets))
    assert await store.get_task("a") == task
    assert await store.get_run("a", run.run_id) == run
    assert await runs_of(store, "b") == []
    # Planned again from what is stored now, it applies.
    await end(store, "a", OK)
    assert len(await runs_of(store, "b")) == 1


async def test_a_chained_commit_sent_again_applies_once(store: Store) -> None:
    await create(store, "b")
    await create(store, "c")
    await create(store, "a", chain=Chain(on_success=["b", "c"]))
    task, run = await started(store, "a")
    planned, targets = await chained_change(store, finish_run(task, run, OK, utcnow()))
    change = change_of(planned, targets)
    await store.commit(change)
    await store.commit(change)  # its answer was lost: sent again
    assert await store.commit_each([change]) == [True]
    assert [len(await runs_of(store, t)) for t in ("b", "c")] == [1, 1]


async def test_commit_each_applies_a_chained_change_atomically(store: Store) -> None:
    await create(store, "b")
    await create(store, "a", chain=Chain(on_failure=["b"]))
    task, run = await started(store, "a")
    planned, targets = await chained_change(store, finish_run(task, run, FAILED, utcnow()))
    assert await store.commit_each([change_of(planned, targets)]) == [True]
    [queued] = await runs_of(store, "b")
    assert queued.triggered_by == TriggeredBy(task_id="a", run_id=run.run_id)


async def test_a_deleted_target_is_recorded_as_missing(store: Store) -> None:
    await create(store, "b")
    await create(store, "c")
    await create(store, "a", chain=Chain(on_success=["b", "c"]))
    b = await store.get_task("b")
    assert b is not None
    await store.commit(TaskChange("b", b.revision, None))
    await started(store, "a")
    ended = await end(store, "a", OK)
    assert [(t.task_id, t.outcome) for t in ended.run.triggered] == [
        ("b", ChainOutcome.MISSING),
        ("c", ChainOutcome.QUEUED),
    ]
    stored = await store.get_run("a", ended.run.run_id)
    assert stored is not None and stored.triggered == ended.run.triggered


async def test_a_busy_target_with_overlap_queue_runs_once_its_run_has_ended(
    store: Store,
) -> None:
    await create(store, "b", overlap=OverlapPolicy.QUEUE)
    await create(store, "a", chain=Chain(on_success=["b"]))
    await started(store, "b")
    _, a_run = await started(store, "a")
    ended = await end(store, "a", OK)
    assert [t.outcome for t in ended.run.triggered] == [ChainOutcome.DEFERRED]
    assert len(await runs_of(store, "b")) == 1  # only its own running run so far

    await end(store, "b", OK)
    b = await store.get_task("b")
    assert b is not None and b.status == TaskStatus.PENDING and b.active_run is not None
    waiting = await store.get_run("b", b.active_run.run_id)
    assert waiting is not None and waiting.status == RunStatus.QUEUED
    assert waiting.triggered_by == TriggeredBy(task_id="a", run_id=a_run.run_id)


async def test_a_busy_target_with_overlap_forbid_records_a_skipped_run(store: Store) -> None:
    await create(store, "b", overlap=OverlapPolicy.FORBID)
    await create(store, "a", chain=Chain(on_success=["b"]))
    _, b_run = await started(store, "b")
    await started(store, "a")
    ended = await end(store, "a", OK)
    [noted] = ended.run.triggered
    assert noted.outcome == ChainOutcome.SKIPPED
    skipped = await store.get_run("b", noted.run_id or "")
    assert skipped is not None and skipped.status == RunStatus.SKIPPED
    assert skipped.error is not None and b_run.run_id in skipped.error
    b = await store.get_task("b")
    assert b is not None and b.active_run is not None and b.active_run.run_id == b_run.run_id


def test_make_task_takes_a_chain() -> None:
    task = make_task("a", chain=Chain(on_success=["b"]))
    assert task.chain == Chain(on_success=["b"], on_failure=[])

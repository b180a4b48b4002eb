"""``TaskStore``, one suite for every adapter: the in-memory one is the reference, Redis
must match."""

from __future__ import annotations

import time
from datetime import timedelta

import anyio
import pytest

from app.domain import (
    RevisionConflict,
    Run,
    TaskAlreadyExists,
    TaskStatus,
    queue_run,
    utcnow,
)
from app.ports import KEEP, UNSCHEDULE, DueAt, Store, TaskChange
from tests.contract.stores import (
    RUN_HISTORY,
    StoreOpener,
    create,
    make_task,
    next_revision,
    running_run,
    unpack,
)


async def test_created_task_reads_back_equal(store: Store) -> None:
    task = await create(store, "a", env={"A": "1"}, args=None, description="d")
    assert await store.get_task("a") == task
    assert await store.get_task("missing") is None


async def test_duplicate_id_is_refused_and_keeps_the_original(store: Store) -> None:
    original = await create(store, "a", name="original")
    with pytest.raises(TaskAlreadyExists):
        await store.commit(TaskChange("a", None, make_task("a", name="impostor")))
    assert await store.get_task("a") == original


async def test_stale_revision_is_a_conflict_and_changes_nothing(store: Store) -> None:
    task = await create(store, "a")
    renamed = next_revision(task, name="renamed")
    await store.commit(TaskChange("a", task.revision, renamed))
    with pytest.raises(RevisionConflict):
        await store.commit(TaskChange("a", task.revision, next_revision(task, name="late")))
    assert await store.get_task("a") == renamed


async def test_commit_on_a_deleted_task_is_a_conflict(store: Store) -> None:
    task = await create(store, "a")
    await store.commit(TaskChange("a", task.revision, None))
    with pytest.raises(RevisionConflict):
        await store.commit(TaskChange("a", task.revision, next_revision(task)))
    assert await store.get_task("a") is None


async def test_listing_pages_in_id_order(store: Store) -> None:
    ids = [f"t{n:02}" for n in range(25)]
    for task_id in reversed(ids):
        await create(store, task_id)
    seen: list[str] = []
    pages: list[tuple[int, str | None]] = []
    after = None
    while True:
        page = await store.list_tasks(status=None, limit=10, after=after)
        seen += [t.id for t in page.tasks]
        pages.append((len(page.tasks), page.after))
        if page.after is None:
            break
        after = page.after
    assert seen == ids
    assert pages == [(10, "t09"), (10, "t19"), (5, None)]


async def test_a_page_that_reaches_the_end_of_the_index_says_so(store: Store) -> None:
    for task_id in ("a", "b"):
        await create(store, task_id)
    page = await store.list_tasks(status=None, limit=2, after=None)
    assert ([t.id for t in page.tasks], page.unreadable, page.after) == (["a", "b"], [], None)
    assert (await store.list_tasks(status=None, limit=1, after=None)).after == "a"
    empty = await store.list_tasks(status=TaskStatus.RUNNING, limit=1, after=None)
    assert (empty.tasks, empty.unreadable, empty.after) == ([], [], None)


async def test_status_filter_follows_transitions(store: Store) -> None:
    for task_id in ("a", "b", "c"):
        await create(store, task_id)
    task = await store.get_task("b")
    assert task is not None
    pending, run = unpack(queue_run(task, utcnow()))
    await store.commit(TaskChange("b", task.revision, pending, runs=[run]))

    async def ids(status: TaskStatus) -> list[str]:
        page = await store.list_tasks(status=status, limit=100, after=None)
        return [t.id for t in page.tasks]

    assert await ids(TaskStatus.CREATED) == ["a", "c"]
    assert await ids(TaskStatus.PENDING) == ["b"]
    await store.commit(TaskChange("b", pending.revision, None))
    assert await ids(TaskStatus.PENDING) == []
    listed = await store.list_tasks(status=None, limit=10, after=None)
    assert [t.id for t in listed.tasks] == ["a", "c"]


async def test_runs_are_kept_newest_first_and_bounded(store: Store) -> None:
    task = await create(store, "a")
    runs: list[Run] = []
    for _ in range(RUN_HISTORY + 3):
        pending, run = unpack(queue_run(task, utcnow()))
        idle = next_revision(pending, status=TaskStatus.CREATED, active_run=None)
        await store.commit(TaskChange("a", task.revision, idle, runs=[run]))
        task = idle
        runs.append(run)
        await anyio.sleep(0.002)  # run ids order by millisecond
    listed = (await store.list_runs("a", limit=100)).runs
    assert [r.run_id for r in listed] == [r.run_id for r in reversed(runs[-RUN_HISTORY:])]
    assert (await store.list_runs("a", limit=2)).runs == listed[:2]
    assert await store.get_run("a", runs[-1].run_id) == runs[-1]
    assert await store.get_run("a", runs[0].run_id) is None


async def test_delete_removes_runs_and_schedule(store: Store) -> None:
    task = await create(store, "a")
    pending, run = unpack(queue_run(task, utcnow()))
    await store.commit(TaskChange("a", task.revision, pending, runs=[run], schedule=DueAt(0)))
    await store.commit(TaskChange("a", pending.revision, None))
    assert await store.get_run("a", run.run_id) is None
    assert await store.claim_due(now=time.time(), limit=10, lease=30, token="t") == []
    again = await create(store, "a")
    assert (await store.list_runs("a", limit=10)).runs == []
    assert again == await store.get_task("a")


async def test_claim_takes_only_due_entries_once_until_the_lease_expires(store: Store) -> None:
    now = time.time()
    for task_id, when in (("past", now - 5), ("now", now), ("later", now + 60)):
        task = await create(store, task_id)
        await store.commit(
            TaskChange(task_id, task.revision, next_revision(task), schedule=DueAt(when))
        )

    claims = await store.claim_due(now=now, limit=10, lease=30, token="one")
    assert [c.task_id for c in claims] == ["past", "now"]
    assert all(c.task is not None and c.task.id == c.task_id for c in claims)
    assert [c.due for c in claims] == pytest.approx([now - 5, now], abs=1e-3)  # before the claim
    assert await store.claim_due(now=now + 29, limit=10, lease=30, token="two") == []
    expired = await store.claim_due(now=now + 31, limit=10, lease=30, token="two")
    assert sorted(c.task_id for c in expired) == ["now", "past"]


async def test_claim_respects_the_limit_in_due_order(store: Store) -> None:
    now = time.time()
    for n in range(5):
        task = await create(store, f"t{n}")
        await store.commit(TaskChange(task.id, 0, next_revision(task), schedule=DueAt(now - n)))
    claims = await store.claim_due(now=now, limit=2, lease=30, token="x")
    assert [c.task_id for c in claims] == ["t4", "t3"]


async def test_concurrent_claimers_never_share_an_entry(
    store: Store, open_another: StoreOpener
) -> None:
    now = time.time()
    for n in range(200):
        task = await create(store, f"t{n:03}")
        await store.commit(TaskChange(task.id, 0, next_revision(task), schedule=DueAt(now)))
    claimed: list[list[str]] = [[], [], []]

    async def claimer(index: int) -> None:
        async with open_another() as own:
            while batch := await own.claim_due(now=now, limit=7, lease=30, token=str(index)):
                claimed[index] += [c.task_id for c in batch]

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for index in range(3):
                tg.start_soon(claimer, index)
    everything = [task_id for batch in claimed for task_id in batch]
    assert sorted(everything) == [f"t{n:03}" for n in range(200)]


async def test_release_removes_only_entries_the_token_still_holds(store: Store) -> None:
    now = time.time()
    tasks = {}
    for task_id in ("kept", "released", "rescheduled"):
        task = await create(store, task_id)
        tasks[task_id] = next_revision(task)
        await store.commit(TaskChange(task_id, 0, tasks[task_id], schedule=DueAt(now)))
    await store.claim_due(now=now, limit=10, lease=30, token="mine")
    # Someone reschedules one task while the claim is held: the claim is void.
    later = next_revision(tasks["rescheduled"])
    await store.commit(TaskChange("rescheduled", 1, later, schedule=DueAt(now + 1)))
    await store.release_claims(token="other", task_ids=["kept"])
    await store.release_claims(token="mine", task_ids=["released", "rescheduled"])
    claims = await store.claim_due(now=now + 60, limit=10, lease=30, token="next")
    assert sorted(c.task_id for c in claims) == ["kept", "rescheduled"]


async def test_unschedule_removes_the_entry(store: Store) -> None:
    task = await create(store, "a")
    scheduled = next_revision(task)
    await store.commit(TaskChange("a", 0, scheduled, schedule=DueAt(0)))
    await store.commit(TaskChange("a", 1, next_revision(scheduled), schedule=UNSCHEDULE))
    assert await store.claim_due(now=time.time(), limit=10, lease=30, token="t") == []


async def test_commit_each_reports_each_change(store: Store) -> None:
    task = await create(store, "a")
    applied = await store.commit_each(
        [
            TaskChange("b", None, make_task("b")),
            TaskChange("a", 7, next_revision(task)),
            TaskChange("a", None, make_task("a")),
            TaskChange("a", 0, next_revision(task, name="new")),
        ]
    )
    assert applied == [True, False, False, True]
    fetched = await store.get_task("a")
    assert fetched is not None and fetched.name == "new"


async def test_a_change_sent_again_after_it_was_applied_reports_applied(store: Store) -> None:
    # What a caller does when the answer to a commit was lost in an outage.
    task = await create(store, "a")
    pending, run = unpack(queue_run(task, utcnow()))
    change = TaskChange("a", task.revision, pending, runs=[run])
    assert await store.commit_each([change]) == [True]
    assert await store.commit_each([change]) == [True]
    await store.commit(change)
    assert await store.get_task("a") == pending
    assert (await store.list_runs("a", limit=10)).runs == [run]
    # A different change planned from the same old revision is still a conflict.
    assert await store.commit_each([TaskChange("a", task.revision, next_revision(task))]) == [False]


async def test_get_tasks_and_runs_reads_each_pair_in_order(store: Store) -> None:
    task = await create(store, "a")
    pending, run = unpack(queue_run(task, utcnow()))
    await store.commit(TaskChange("a", task.revision, pending, runs=[run]))
    other = await create(store, "b")
    assert await store.get_tasks_and_runs([]) == []
    read = await store.get_tasks_and_runs(
        [("a", run.run_id), ("b", run.run_id), ("gone", run.run_id), ("a", run.run_id)]
    )
    assert read == [(pending, run), (other, None), (None, None), (pending, run)]
    assert read[0] == await store.get_task_and_run("a", run.run_id)


async def test_read_and_commit_each_reads_as_before_the_commits_and_answers_each(
    store: Store,
) -> None:
    task = await create(store, "a")
    pending, run = unpack(queue_run(task, utcnow()))
    await store.commit(TaskChange("a", task.revision, pending, runs=[run]))
    renamed = next_revision(pending, name="renamed")
    reads, applied = await store.read_and_commit_each(
        [("a", run.run_id), ("gone", run.run_id)],
        [
            TaskChange("a", pending.revision, renamed),
            TaskChange("b", None, make_task("b")),
            TaskChange("a", pending.revision, next_revision(pending, name="late")),
        ],
    )
    assert reads == [(pending, run), (None, None)]  # read before the commits
    assert applied == [True, True, False]
    assert await store.get_task("a") == renamed
    assert await store.get_task("b") is not None
    # Either part may be empty.
    assert await store.read_and_commit_each([], []) == ([], [])
    assert await store.read_and_commit_each([("a", run.run_id)], []) == ([(renamed, run)], [])
    c = make_task("c")
    assert await store.read_and_commit_each([], [TaskChange("c", None, c)]) == ([], [True])


async def test_get_tasks_reads_each_task_in_order(store: Store) -> None:
    a, b = await create(store, "a"), await create(store, "b")
    assert await store.get_tasks([]) == []
    assert await store.get_tasks(["b", "gone", "a", "b"]) == [b, None, a, b]


async def test_wait_for_due_waits_for_the_earliest_entry(store: Store) -> None:
    task = await create(store, "a")
    due = time.time() + 0.3
    await store.commit(TaskChange("a", 0, next_revision(task), schedule=DueAt(due)))
    with anyio.fail_after(5):
        while time.time() < due:
            await store.wait_for_due(max_wait=10)
    assert time.time() - due < 0.2


async def test_wait_for_due_wakes_ahead_of_the_earliest_entry_when_asked(store: Store) -> None:
    task = await create(store, "a")
    due = time.time() + 1.3
    await store.commit(TaskChange("a", 0, next_revision(task), schedule=DueAt(due)))
    with anyio.fail_after(5):
        while time.time() < due - 1:
            await store.wait_for_due(max_wait=10, ahead=1)
    assert time.time() < due - 0.8


async def test_wait_for_due_wakes_when_an_earlier_entry_is_added_elsewhere(
    store: Store, open_another: StoreOpener
) -> None:
    woke_at: list[float] = []
    added_at = 0.0

    async def waiter() -> None:
        await store.wait_for_due(max_wait=30)
        woke_at.append(time.time())

    async with open_another() as other:
        task = await create(other, "a")
        await store.wait_for_due(max_wait=0)  # subscribes, where the store subscribes
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                added_at = time.time()
                when = (utcnow() + timedelta(hours=1)).timestamp()
                await other.commit(TaskChange("a", 0, next_revision(task), schedule=DueAt(when)))
    assert woke_at and woke_at[0] - added_at < 1


async def test_extend_leases_moves_only_existing_entries(store: Store) -> None:
    now = time.time()
    task = await create(store, "held")
    await store.commit(TaskChange("held", 0, next_revision(task), schedule=DueAt(now)))
    await create(store, "idle")
    await store.extend_leases(["held", "idle", "missing"], until=now + 60)
    assert await store.claim_due(now=now + 59, limit=10, lease=30, token="t") == []
    claims = await store.claim_due(now=now + 60, limit=10, lease=30, token="t")
    assert [c.task_id for c in claims] == ["held"]


async def test_count_due_counts_due_entries_not_claimed(store: Store) -> None:
    now = time.time()
    assert await store.count_due(now=now) == 0
    for task_id, when in (("past", now - 5), ("now", now), ("later", now + 20), ("p2", now - 1)):
        task = await create(store, task_id)
        await store.commit(
            TaskChange(task_id, task.revision, next_revision(task), schedule=DueAt(when))
        )
    assert await store.count_due(now=now) == 3
    await store.claim_due(now=now, limit=1, lease=30, token="one")  # leases "past"
    assert await store.count_due(now=now) == 2
    assert await store.count_due(now=now + 25) == 3  # "later" is due; the lease is not over


def creation(task_id: str, *, due: float | None = None, **changes: object) -> TaskChange:
    """The change ``create_each`` takes for a new task (due at ``due``, when given)."""
    task = make_task(task_id, **changes)
    return TaskChange(task_id, None, task, schedule=UNSCHEDULE if due is None else DueAt(due))


async def test_create_each_creates_each_new_task_on_its_own(store: Store) -> None:
    original = await create(store, "taken", name="original")
    now = time.time()
    changes = [
        creation("a", description='quotes " and \\ and é'),
        creation("taken", name="impostor"),
        creation("due", due=now - 1, status=TaskStatus.PENDING),
        creation("a", name="second a"),
    ]

    created = await store.create_each(changes)

    assert created == [True, False, True, False]
    assert await store.get_task("a") == changes[0].task
    assert await store.get_task("taken") == original
    assert await store.get_task("due") == changes[2].task
    listed = await store.list_tasks(status=None, limit=10, after=None)
    assert [task.id for task in listed.tasks] == ["a", "due", "taken"]
    pending = await store.list_tasks(status=TaskStatus.PENDING, limit=10, after=None)
    assert [task.id for task in pending.tasks] == ["due"]
    claims = await store.claim_due(now=now, limit=10, lease=30, token="t")
    assert [claim.task_id for claim in claims] == ["due"]


async def test_create_each_of_nothing_creates_nothing(store: Store) -> None:
    assert await store.create_each([]) == []
    assert (await store.list_tasks(status=None, limit=10, after=None)).tasks == []


async def test_create_each_refuses_a_change_that_is_not_a_creation(store: Store) -> None:
    task = await create(store, "a")

    with pytest.raises(ValueError, match="not the creation"):
        await store.create_each([creation("b"), TaskChange("a", 0, next_revision(task))])

    assert await store.get_task("b") is None


async def test_create_each_wakes_a_waiting_scheduler_elsewhere(
    store: Store, open_another: StoreOpener
) -> None:
    woke_at: list[float] = []
    added_at = 0.0

    async def waiter() -> None:
        await store.wait_for_due(max_wait=30)
        woke_at.append(time.time())

    async with open_another() as other:
        await store.wait_for_due(max_wait=0)  # subscribes, where the store subscribes
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                added_at = time.time()
                await other.create_each([creation("a", due=added_at + 3600)])
    assert woke_at and woke_at[0] - added_at < 1


async def test_scheduled_entries_read_by_score_then_id_with_their_tasks(store: Store) -> None:
    for task_id, when in (("b", 20.0), ("a", 20.0), ("c", 10.5), ("late", 99.0), ("gone", 15.0)):
        task = await create(store, task_id)
        await store.commit(
            TaskChange(task_id, task.revision, next_revision(task), schedule=DueAt(when))
        )
    unscheduled = await create(store, "idle")
    gone = await store.get_task("gone")
    assert gone is not None
    await store.commit(TaskChange("gone", gone.revision, None, schedule=KEEP))

    entries = await store.scheduled_entries(until=20.0, offset=0, limit=10)
    assert [(e.task_id, e.score) for e in entries] == [("c", 10.5), ("a", 20.0), ("b", 20.0)]
    assert [e.task.id if e.task else None for e in entries] == ["c", "a", "b"]
    assert await store.get_task("idle") == unscheduled

    paged = await store.scheduled_entries(until=100.0, offset=1, limit=2)
    assert [e.task_id for e in paged] == ["a", "b"]
    assert await store.scheduled_entries(until=100.0, offset=4, limit=2) == []
    assert await store.scheduled_entries(until=5.0, offset=0, limit=2) == []


async def test_busy_tasks_are_the_running_and_the_claimed(store: Store) -> None:
    now = time.time()
    for task_id in ("claimed", "idle"):
        task = await create(store, task_id)
        due = now - 1 if task_id == "claimed" else now + 60
        await store.commit(
            TaskChange(task_id, task.revision, next_revision(task), schedule=DueAt(due))
        )
    await store.claim_due(now=now, limit=10, lease=30, token="s")
    await running_run(store, "running")
    await create(store, "unscheduled")

    busy = await store.busy_tasks(limit=10)
    assert sorted(task.id for task in busy) == ["claimed", "running"]
    assert len(await store.busy_tasks(limit=1)) == 1

    await store.release_claims(token="s", task_ids=["claimed"])
    assert [task.id for task in await store.busy_tasks(limit=10)] == ["running"]

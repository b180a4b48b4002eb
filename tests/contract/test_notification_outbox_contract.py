"""``NotificationOutbox``, one suite for every adapter: notifications written by the commit
that causes them, leased to one notifier at a time, settled or dropped, and their
records kept with their run."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from app.domain import (
    Notify,
    Outcome,
    Run,
    StillRunning,
    Task,
    cancel_queued,
    finish_run,
    queue_run,
    start_run,
)
from app.notifications import DeliveryState, NotifyEvent, OutboxEntry, delivered, not_delivered
from app.ports import Store, TaskChange
from tests.contract.stores import RUN_HISTORY, create

HOOK = "https://hooks.example/taskq"
NOTIFY = Notify(
    on_start=f"{HOOK}/start",
    on_success=f"{HOOK}/success",
    on_still_running=StillRunning(url=f"{HOOK}/slow", after=3600),
)


def _now() -> float:
    """Now, in whole seconds: exact through a datetime and back."""
    return float(int(time.time()))


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def _started(store: Store, task_id: str, now: float) -> tuple[Task, Run]:
    """A task with ``NOTIFY`` whose run started at ``now``, committed as the roles do."""
    task = await create(store, task_id, notify=NOTIFY)
    queued = queue_run(task, _at(now))
    await store.commit(TaskChange.of(queued))
    started = start_run(queued.task, queued.run, "w", _at(now), lease_until=_at(now + 30))
    await store.commit(TaskChange.of(started))
    return started.task, started.run


def _completed(task: Task, run: Run, now: float) -> TaskChange:
    outcome = Outcome(exit_code=0, duration=1.0, output="", truncated=False)
    return TaskChange.of(finish_run(task, run, outcome, _at(now)))


def _events(entries: list[OutboxEntry]) -> list[NotifyEvent]:
    return [entry.notification.event for entry in entries]


async def test_a_commit_writes_its_notifications_with_pending_records(store: Store) -> None:
    now = _now()
    _, run = await _started(store, "a", now)
    assert await store.next_notification_due() == now
    claimed = await store.claim_notifications(now=now, limit=10, lease=30, token="n1")
    assert _events(claimed) == [NotifyEvent.ON_START]
    assert claimed[0].notification.url == f"{HOOK}/start"
    records = await store.notification_records([run.run_id, "no-such-run"])
    assert list(records) == [run.run_id]
    assert [(r.event, r.state, r.attempts) for r in records[run.run_id]] == [
        (NotifyEvent.ON_START, DeliveryState.PENDING, 0),
        (NotifyEvent.ON_STILL_RUNNING, DeliveryState.PENDING, 0),
    ]


async def test_a_task_without_notify_writes_nothing(store: Store) -> None:
    now = _now()
    task = await create(store, "quiet")
    await store.commit(TaskChange.of(queue_run(task, _at(now))))
    assert await store.next_notification_due() is None
    assert await store.claim_notifications(now=now + 1, limit=10, lease=30, token="n1") == []


async def test_an_entry_is_leased_to_one_notifier_until_its_lease_ends(store: Store) -> None:
    now = _now()
    await _started(store, "a", now)
    first = await store.claim_notifications(now=now, limit=10, lease=30, token="n1")
    assert _events(first) == [NotifyEvent.ON_START]
    assert await store.claim_notifications(now=now + 29, limit=10, lease=30, token="n2") == []
    # n1 died without settling: the entry comes back to another notifier.
    again = await store.claim_notifications(now=now + 31, limit=10, lease=30, token="n2")
    assert _events(again) == [NotifyEvent.ON_START]


async def test_entries_are_claimed_when_due_earliest_first_up_to_the_limit(store: Store) -> None:
    now = _now()
    task, run = await _started(store, "a", now)
    await store.commit(_completed(task, run, now + 5))
    assert await store.claim_notifications(now=now - 1, limit=10, lease=30, token="n1") == []
    claimed = await store.claim_notifications(now=now + 5, limit=1, lease=30, token="n1")
    assert _events(claimed) == [NotifyEvent.ON_START]
    claimed = await store.claim_notifications(now=now + 5, limit=10, lease=30, token="n1")
    assert _events(claimed) == [NotifyEvent.ON_SUCCESS]
    # Claimed entries are due again when their lease ends.
    assert await store.next_notification_due() == now + 5 + 30


async def test_a_retry_is_due_again_and_its_record_counts_the_attempt(store: Store) -> None:
    now = _now()
    _, run = await _started(store, "a", now)
    [entry] = await store.claim_notifications(now=now, limit=10, lease=30, token="n1")
    failed, retry_at = not_delivered(
        entry,
        "HTTP 500",
        _at(now),
        retryable=True,
        max_attempts=5,
        first_delay=10,
        jitter=0,
    )
    assert retry_at == now + 10
    await store.settle_notification(failed, token="n1", retry_at=retry_at)
    assert await store.claim_notifications(now=now + 9, limit=10, lease=30, token="n2") == []
    [again] = await store.claim_notifications(now=now + 10, limit=10, lease=30, token="n2")
    assert again.record.attempts == 1
    await store.settle_notification(delivered(again, _at(now + 10)), token="n2", retry_at=None)
    assert await store.claim_notifications(now=now + 100, limit=10, lease=30, token="n3") == []
    [record, _] = (await store.notification_records([run.run_id]))[run.run_id]
    assert (record.state, record.attempts, record.last_error) == (
        DeliveryState.DELIVERED,
        2,
        "HTTP 500",
    )
    assert record.delivered_at == _at(now + 10)


async def test_a_notifier_whose_lease_ended_cannot_settle(store: Store) -> None:
    now = _now()
    _, run = await _started(store, "a", now)
    [late] = await store.claim_notifications(now=now, limit=10, lease=30, token="n1")
    [entry] = await store.claim_notifications(now=now + 31, limit=10, lease=30, token="n2")
    await store.settle_notification(delivered(late, _at(now + 40)), token="n1", retry_at=None)
    [record, _] = (await store.notification_records([run.run_id]))[run.run_id]
    assert record.state == DeliveryState.PENDING
    await store.settle_notification(delivered(entry, _at(now + 41)), token="n2", retry_at=None)
    [record, _] = (await store.notification_records([run.run_id]))[run.run_id]
    assert (record.state, record.attempts) == (DeliveryState.DELIVERED, 1)


async def test_a_dropped_notification_leaves_no_entry_and_no_record(store: Store) -> None:
    now = _now()
    task, run = await _started(store, "a", now)
    await store.commit(_completed(task, run, now + 1))
    claimed = await store.claim_notifications(now=now + 3600, limit=10, lease=30, token="n1")
    [still] = [e for e in claimed if e.notification.event == NotifyEvent.ON_STILL_RUNNING]
    await store.drop_notification(still, token="n1")
    events = [r.event for r in (await store.notification_records([run.run_id]))[run.run_id]]
    assert events == [NotifyEvent.ON_START, NotifyEvent.ON_SUCCESS]
    left = await store.claim_notifications(now=now + 9999, limit=10, lease=30, token="n2")
    assert sorted(_events(left)) == [NotifyEvent.ON_START, NotifyEvent.ON_SUCCESS]


async def test_a_resent_commit_does_not_send_its_notifications_again(store: Store) -> None:
    now = _now()
    task, run = await _started(store, "a", now)
    finishing = _completed(task, run, now + 1)
    await store.commit(finishing)
    claimed = await store.claim_notifications(now=now + 1, limit=10, lease=30, token="n1")
    for entry in claimed:
        await store.settle_notification(delivered(entry, _at(now + 1)), token="n1", retry_at=None)
    assert await store.commit_each([finishing]) == [True]  # its first answer was lost
    assert await store.claim_notifications(now=now + 2, limit=10, lease=30, token="n2") == []
    states = {r.state for r in (await store.notification_records([run.run_id]))[run.run_id]}
    assert states == {DeliveryState.DELIVERED, DeliveryState.PENDING}  # still running waits


async def test_records_go_with_the_task(store: Store) -> None:
    now = _now()
    task, run = await _started(store, "a", now)
    await store.commit(TaskChange(task.id, task.revision, None))
    assert await store.notification_records([run.run_id]) == {}
    # What was in the outbox is still delivered (it happened); its record is not revived.
    [entry] = await store.claim_notifications(now=now, limit=10, lease=30, token="n1")
    await store.settle_notification(delivered(entry, _at(now)), token="n1", retry_at=None)
    assert await store.notification_records([run.run_id]) == {}


async def test_records_go_with_their_run_out_of_the_history(store: Store) -> None:
    now = _now()
    task, first = await _started(store, "a", now)
    finished = _completed(task, first, now + 1)
    await store.commit(finished)
    assert finished.task is not None
    task = finished.task
    for n in range(RUN_HISTORY):  # newer runs push the first one out of the history
        queued = queue_run(task, _at(now + 2 + n))
        await store.commit(TaskChange.of(queued))
        cancelled = cancel_queued(queued.task, queued.run, _at(now + 2 + n))
        await store.commit(TaskChange.of(cancelled))
        task = cancelled.task
    assert await store.get_run("a", first.run_id) is None
    assert await store.notification_records([first.run_id]) == {}

"""Look-ahead dispatch in the domain: a fire taken ahead of its due time waits for it,
never fires that time twice nor skips the next, and is withdrawn when the user changes
the schedule before it is due (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from app.domain import (
    NEXT_RUNS_SHOWN,
    InvalidTransition,
    NotDueYet,
    Recurrence,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    cancel,
    fire_schedule,
    next_fires,
    pause,
    recur,
    reschedule,
    resume,
    start_run,
    unschedule,
)
from app.ports import Dispatch, decode_dispatch
from app.scheduler import plan_dispatch

DUE = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
AHEAD = DUE - timedelta(seconds=0.8)
LEASE = timedelta(seconds=30)


def task(**fields: object) -> Task:
    base = Task(
        id="t",
        name="t",
        command="true",
        created_at=DUE - timedelta(hours=1),
        updated_at=DUE - timedelta(hours=1),
    )
    return msgspec.structs.replace(base, **fields)


def every(seconds: float) -> Task:
    schedule = Recurrence(every=seconds, start=DUE - timedelta(hours=1))
    upcoming = next_fires(schedule, AHEAD, NEXT_RUNS_SHOWN)
    assert upcoming[0] == DUE
    return task(schedule=schedule, scheduled_at=DUE, next_runs=upcoming)


def cron(expression: str) -> Task:
    schedule = Recurrence(cron=expression)
    upcoming = next_fires(schedule, AHEAD, NEXT_RUNS_SHOWN)
    assert upcoming[0] == DUE
    return task(schedule=schedule, scheduled_at=DUE, next_runs=upcoming)


def one_shot() -> Task:
    return task(status=TaskStatus.PENDING, scheduled_at=DUE, next_runs=[DUE])


def fired_ahead(idle: Task) -> tuple[Task, Run]:
    fired = fire_schedule(idle, AHEAD)
    return fired.task, fired.run


@pytest.mark.parametrize(
    ("idle", "following"),
    [
        (every(1), DUE + timedelta(seconds=1)),
        (every(60), DUE + timedelta(seconds=60)),
        (cron("* * * * * *"), DUE + timedelta(seconds=1)),
        (cron("0 12 * * *"), DUE + timedelta(days=1)),
    ],
    ids=["every-1s", "every-60s", "cron-every-second", "cron-daily"],
)
def test_a_recurrence_fired_ahead_waits_for_its_due_time_and_moves_on_to_the_next(
    idle: Task, following: datetime
) -> None:
    pending, run = fired_ahead(idle)
    assert run.status == RunStatus.QUEUED and run.not_before == DUE
    assert pending.active_run is not None and pending.active_run.not_before == DUE
    # The next fire is the one after the due time: not the due time again (which a
    # next fire computed from "now" would give), and none skipped.
    assert pending.scheduled_at == following
    assert pending.next_runs[0] == following
    assert DUE not in pending.next_runs


def test_a_fire_ahead_of_time_is_not_a_misfire() -> None:
    idle = msgspec.structs.replace(every(60), misfire="skip", misfire_grace=0.0)
    _, run = fired_ahead(idle)
    assert run.status == RunStatus.QUEUED


def test_a_one_shot_fired_ahead_is_consumed_and_waits_for_its_time() -> None:
    pending, run = fired_ahead(one_shot())
    assert pending.status == TaskStatus.PENDING
    assert pending.scheduled_at is None and pending.next_runs == []
    assert run.not_before == DUE


def test_a_fire_on_time_or_late_carries_no_wait() -> None:
    late = fire_schedule(every(60), DUE + timedelta(seconds=2))
    assert late.run.not_before is None and late.task.active_run is not None
    assert late.task.active_run.not_before is None


def test_a_run_never_starts_before_its_due_time() -> None:
    pending, run = fired_ahead(every(60))
    with pytest.raises(NotDueYet) as refused:
        start_run(pending, run, "w", DUE - timedelta(microseconds=1), lease_until=DUE + LEASE)
    assert refused.value.not_before == DUE
    started = start_run(pending, run, "w", DUE, lease_until=DUE + LEASE)
    assert started.run.started_at == DUE


def test_the_dispatch_carries_the_due_time_and_an_old_one_decodes_without_it() -> None:
    pending, _ = fired_ahead(every(60))
    plan = plan_dispatch(pending, AHEAD)
    assert plan.dispatch is not None and plan.dispatch.not_before == DUE.timestamp()
    old = decode_dispatch(b'{"task_id":"t","run_id":"r","attempt":1}')
    assert old == Dispatch(task_id="t", run_id="r", attempt=1, not_before=None)


def test_the_scheduler_fires_within_the_look_ahead_only() -> None:
    idle = every(60)
    assert plan_dispatch(idle, AHEAD).dispatch is None  # no look-ahead: not due yet
    within = plan_dispatch(idle, AHEAD, fire_until=AHEAD + timedelta(seconds=1))
    assert within.dispatch is not None
    short = plan_dispatch(idle, AHEAD, fire_until=AHEAD + timedelta(seconds=0.5))
    assert short.dispatch is None


def test_a_run_lease_claimed_within_the_look_ahead_is_put_back_not_taken_for_lost() -> None:
    pending, run = fired_ahead(every(60))
    started = start_run(pending, run, "w", DUE, lease_until=DUE + LEASE)
    lease_end = DUE + LEASE
    now = lease_end - timedelta(seconds=0.5)
    plan = plan_dispatch(
        started.task,
        now,
        started.run,
        fire_until=now + timedelta(seconds=1),
        entry_due=lease_end,
    )
    assert plan.dispatch is None and plan.lease_ahead
    assert plan.change is not None and plan.change.runs == ()
    assert plan.change.schedule.when == lease_end.timestamp()  # type: ignore[union-attr]


def test_a_stored_run_and_task_from_before_look_ahead_still_decode() -> None:
    old_run = (
        b'{"run_id":"r","task_id":"t","attempt":1,"status":"queued",'
        b'"queued_at":"2026-01-01T00:00:00Z"}'
    )
    assert msgspec.json.decode(old_run, type=Run).not_before is None
    pending, _ = fired_ahead(every(60))
    doc = msgspec.json.encode(pending).replace(b',"not_before":"2026-01-01T12:00:00Z"', b"")
    assert msgspec.json.decode(doc, type=Task).active_run.not_before is None  # type: ignore[union-attr]


def test_pausing_before_the_due_time_withdraws_the_fire() -> None:
    pending, run = fired_ahead(every(60))
    paused = pause(pending, DUE - timedelta(seconds=0.5), run)
    withdrawn = paused.run
    assert withdrawn.run_id == run.run_id and withdrawn.status == RunStatus.SKIPPED
    assert "paused" in (withdrawn.error or "")
    after = paused.task
    assert after.paused and after.active_run is None and after.status == TaskStatus.CREATED
    assert after.scheduled_at == DUE  # the fire is not lost: resume decides
    assert paused.schedule.__class__.__name__ == "Unschedule"
    # Its message, when it comes, finds nothing to start.
    with pytest.raises(InvalidTransition):
        start_run(after, withdrawn, "w", DUE, lease_until=DUE + LEASE)
    resumed = resume(after, DUE + timedelta(seconds=30))
    assert resumed.task.scheduled_at == DUE + timedelta(seconds=60)


def test_pausing_a_one_shot_fired_ahead_keeps_its_time_for_resume() -> None:
    pending, run = fired_ahead(one_shot())
    paused = pause(pending, DUE - timedelta(seconds=0.5), run).task
    assert paused.paused and paused.scheduled_at == DUE and paused.active_run is None
    resumed = resume(paused, DUE + timedelta(seconds=5)).task
    assert resumed.status == TaskStatus.PENDING and resumed.scheduled_at == DUE  # fires at once


def test_rescheduling_before_the_due_time_runs_at_the_new_time_only() -> None:
    pending, run = fired_ahead(every(60))
    later = DUE + timedelta(minutes=5)
    moved = reschedule(pending, later, DUE - timedelta(seconds=0.5), run)
    assert moved.run.status == RunStatus.SKIPPED
    assert moved.task.active_run is None and moved.task.scheduled_at == later
    assert moved.task.status == TaskStatus.PENDING
    assert moved.schedule.when == later.timestamp()  # type: ignore[union-attr]


def test_a_new_recurrence_before_the_due_time_replaces_the_fire() -> None:
    pending, run = fired_ahead(one_shot())
    now = DUE - timedelta(seconds=0.5)
    changed = recur(pending, Recurrence(every=3600, start=DUE + timedelta(hours=1)), now, run)
    assert changed.run.status == RunStatus.SKIPPED
    assert changed.task.active_run is None
    assert changed.task.scheduled_at == DUE + timedelta(hours=1)


def test_unscheduling_before_the_due_time_withdraws_the_fire() -> None:
    pending, run = fired_ahead(every(60))
    idle = unschedule(pending, DUE - timedelta(seconds=0.5), run)
    assert idle.run.status == RunStatus.SKIPPED
    assert idle.task.active_run is None and idle.task.scheduled_at is None


def test_cancelling_before_the_due_time_cancels_the_queued_run() -> None:
    pending, run = fired_ahead(every(60))
    cancelled = cancel(pending, run, DUE - timedelta(seconds=0.5))
    assert cancelled.run.status == RunStatus.CANCELLED
    assert cancelled.task.status == TaskStatus.CANCELLED
    assert cancelled.task.scheduled_at == DUE + timedelta(seconds=60)  # the next fire stays


def test_a_fire_that_came_due_is_not_withdrawn_by_a_pause() -> None:
    pending, run = fired_ahead(every(60))
    paused = pause(pending, DUE + timedelta(seconds=0.1), run)
    assert paused.runs == () and paused.task.active_run == pending.active_run

"""Misfire and overlap policies: what a late fire, or a fire during a run, turns into."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from app.domain import (
    MisfirePolicy,
    Outcome,
    OverlapPolicy,
    Recurrence,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    Transition,
    cancel_queued,
    cancel_running,
    due_at,
    finish_run,
    fire_schedule,
    lose_run,
    queue_run,
    start_run,
)
from app.schemas import TaskCreate, TaskUpdate

T0 = datetime(2026, 1, 1, 1, tzinfo=UTC)
HOURLY = Recurrence(cron="0 * * * *")
LEASE = timedelta(seconds=30)


def hourly_task(**changes: object) -> Task:
    task = Task(
        id="t",
        name="t",
        command="true",
        created_at=T0,
        updated_at=T0,
        schedule=HOURLY,
        scheduled_at=T0,
        next_runs=[T0 + timedelta(hours=n) for n in range(5)],
    )
    return msgspec.structs.replace(task, **changes)


def after(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_skipping_task_records_a_skipped_run_for_a_fire_later_than_its_grace() -> None:
    task = hourly_task(misfire=MisfirePolicy.SKIP, misfire_grace=60)
    # The scheduler was down from before 01:00 until 03:20.
    fired = fire_schedule(task, after(2 * 3600 + 1200))
    waiting, [run] = fired.task, fired.runs
    assert run.status == RunStatus.SKIPPED
    assert run.queued_at == T0 and run.started_at is None
    assert run.error is not None and "misfire" in run.error and "grace 60 s" in run.error
    # Nothing is queued: the task waits for its next fire, after now.
    assert waiting.status == TaskStatus.CREATED and waiting.active_run is None
    assert waiting.scheduled_at == datetime(2026, 1, 1, 4, tzinfo=UTC)
    assert waiting.next_runs[0] == waiting.scheduled_at
    assert fired.schedule == due_at(waiting.scheduled_at), "due at its next fire"


def test_a_fire_late_within_the_grace_time_runs_even_when_misfires_are_skipped() -> None:
    task = hourly_task(misfire=MisfirePolicy.SKIP, misfire_grace=60)
    fired = fire_schedule(task, after(59))
    pending, run = fired.task, fired.run
    assert run.status == RunStatus.QUEUED and pending.status == TaskStatus.PENDING


def test_coalesce_runs_once_however_late() -> None:
    fired = fire_schedule(hourly_task(misfire_grace=0), after(5 * 3600))
    pending, run = fired.task, fired.run
    assert run.status == RunStatus.QUEUED and pending.status == TaskStatus.PENDING
    assert pending.scheduled_at == datetime(2026, 1, 1, 7, tzinfo=UTC)


def test_a_one_shot_time_runs_however_late_whatever_the_misfire_policy() -> None:
    once = hourly_task(schedule=None, next_runs=[T0], misfire=MisfirePolicy.SKIP, misfire_grace=0)
    fired = fire_schedule(once, after(3600))
    pending, run = fired.task, fired.run
    assert run.status == RunStatus.QUEUED and pending.scheduled_at is None


def running(task: Task, at: datetime) -> tuple[Task, Run]:
    queued = queue_run(task, at)
    started = start_run(queued.task, queued.run, "w", at, lease_until=at + LEASE)
    return started.task, started.run


def ended(transition: Transition) -> tuple[Task, tuple[Run, ...]]:
    return transition.task, transition.runs


def succeeded(duration: float) -> Outcome:
    return Outcome(exit_code=0, duration=duration, output="", truncated=False)


def test_queue_runs_a_fire_that_came_during_a_run_right_after_it() -> None:
    # Started by hand at 00:59:00, the run ends at 01:00:30: the 01:00 fire waits for it.
    task, run = running(hourly_task(), after(-60))
    done, runs = ended(finish_run(task, run, succeeded(90), after(30)))
    assert [r.status for r in runs] == [RunStatus.COMPLETED]
    # Due now, not 30 s ago: a policy of skipping misfires must not take it for one.
    assert done.scheduled_at == after(30) and done.next_runs[0] == after(30)
    pending, fired = ended(
        fire_schedule(
            msgspec.structs.replace(done, misfire=MisfirePolicy.SKIP, misfire_grace=0), after(30)
        )
    )
    assert fired[0].status == RunStatus.QUEUED and pending.status == TaskStatus.PENDING


def test_forbid_skips_a_fire_that_came_during_a_run_and_records_it() -> None:
    task, run = running(hourly_task(overlap=OverlapPolicy.FORBID), after(-60))
    done, runs = ended(finish_run(task, run, succeeded(90), after(30)))
    finished, skipped = runs
    assert finished.status == RunStatus.COMPLETED
    assert skipped.status == RunStatus.SKIPPED and skipped.queued_at == T0
    assert skipped.error is not None and run.run_id in skipped.error
    assert done.status == TaskStatus.COMPLETED
    assert done.last_run is not None and done.last_run.run_id == finished.run_id
    assert done.scheduled_at == datetime(2026, 1, 1, 2, tzinfo=UTC)


def test_forbid_leaves_a_fire_still_ahead_alone() -> None:
    task, run = running(hourly_task(overlap=OverlapPolicy.FORBID), after(-60))
    done, runs = ended(finish_run(task, run, succeeded(30), after(-30)))
    assert [r.status for r in runs] == [RunStatus.COMPLETED]
    assert done.scheduled_at == T0


def test_a_retry_goes_first_and_the_overlap_is_settled_when_the_attempts_end() -> None:
    task, run = running(hourly_task(overlap=OverlapPolicy.FORBID, max_attempts=2), after(-60))
    failed = Outcome(exit_code=1, duration=90, output="", truncated=False)
    waiting, runs = ended(finish_run(task, run, failed, after(30)))
    assert [r.status for r in runs] == [RunStatus.FAILED, RunStatus.QUEUED]
    assert waiting.scheduled_at == T0  # untouched while the retry is pending


@pytest.mark.parametrize("how", ["cancel running", "cancel queued", "lost"])
def test_forbid_applies_however_the_run_ended(how: str) -> None:
    task = hourly_task(overlap=OverlapPolicy.FORBID)
    if how == "cancel queued":
        queued = queue_run(task, after(-60))
        done, runs = ended(cancel_queued(queued.task, queued.run, after(30)))
    else:
        started, run = running(task, after(-60))
        if how == "lost":
            done, runs = _lose_until_failed(started, run)
        else:
            stopped = Outcome(exit_code=None, duration=90, output="", truncated=False)
            done, runs = ended(cancel_running(started, run, stopped, after(30)))
    assert runs[-1].status == RunStatus.SKIPPED
    assert done.active_run is None
    assert done.scheduled_at == datetime(2026, 1, 1, 2, tzinfo=UTC)


def _lose_until_failed(task: Task, run: Run) -> tuple[Task, tuple[Run, ...]]:
    """Lose runs until the task is out of attempts (its last loss ends it)."""
    while True:
        lost = lose_run(task, run, after(30))
        if lost.task.active_run is None:
            return lost.task, lost.runs
        started = start_run(lost.task, lost.runs[-1], "w", after(30), lease_until=after(60))
        task, run = started.task, started.run


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"misfire": "later"}, "misfire"),
        ({"overlap": "allow"}, "overlap"),
        ({"misfire_grace": -1}, ">= 0"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(body: dict[str, object], message: str) -> None:
    for schema, base in ((TaskCreate, {"name": "n", "command": "true"}), (TaskUpdate, {})):
        with pytest.raises(msgspec.ValidationError, match=message):
            msgspec.json.decode(msgspec.json.encode(base | body), type=schema)

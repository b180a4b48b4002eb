"""The lifecycle events each transition makes (``app.events.lifecycle_events``): every
step a user would notice, once, and none for the workers' bookkeeping."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from app.domain import (
    DEAD_LETTER_LIMIT,
    LOST_RUN_LIMIT,
    Entropy,
    MisfirePolicy,
    Outcome,
    OverlapPolicy,
    Recurrence,
    Run,
    Task,
    TaskStatus,
    Transition,
    cancel,
    cancel_running,
    create,
    dead_lettered,
    delete,
    extend_lease,
    finish_run,
    fire_schedule,
    lose_run,
    pause,
    queue_run,
    recur,
    request_cancel,
    requeue_run,
    reschedule,
    restore_entry,
    resume,
    set_aside,
    start_run,
    touch,
    unschedule,
)
from app.events import Event, EventType, InvalidEventId, event_key, lifecycle_events
from app.ports import TaskChange

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(seconds=5)
LEASE = timedelta(seconds=30)
ENTROPY = Entropy(random.Random(1))


def task(**fields: object) -> Task:
    base = Task(id="t", name="t", command="x", created_at=NOW, updated_at=NOW)
    return msgspec.structs.replace(base, **fields)


def outcome(exit_code: int = 0) -> Outcome:
    return Outcome(exit_code=exit_code, duration=0.5, output="out", truncated=False)


def steps(transition: Transition) -> list[tuple[str, ...]]:
    """Each event as its type, then its run's status and outcome where they apply."""
    return [
        tuple(
            str(value)
            for value in (event.type, event.run_status, event.outcome)
            if value is not None
        )
        for event in lifecycle_events(transition)
    ]


def queued(t: Task | None = None) -> Transition:
    return queue_run(t or task(), NOW, entropy=ENTROPY)


def running(t: Task | None = None) -> tuple[Task, Run]:
    q = queued(t)
    started = start_run(q.task, q.run, "w", NOW, lease_until=NOW + LEASE)
    return started.task, started.run


EVERY = Recurrence(every=60)


def recurring(**fields: object) -> Task:
    """A task on a minute's interval, due at ``NOW`` unless ``fields`` say otherwise."""
    return task(**{"schedule": EVERY, "scheduled_at": NOW, "next_runs": [NOW], **fields})


def test_create_update_and_delete_are_task_events_with_the_time_of_the_change() -> None:
    created = create(task())
    [event] = lifecycle_events(created)
    assert event == Event(
        type=EventType.TASK_CREATED, at=NOW, task_id="t", task_status=TaskStatus.CREATED
    )
    renamed = touch(created.task, LATER, name="new name")
    assert lifecycle_events(renamed) == (
        Event(type=EventType.TASK_UPDATED, at=LATER, task_id="t", task_status=TaskStatus.CREATED),
    )
    assert lifecycle_events(delete(renamed.task, LATER)) == (
        Event(type=EventType.TASK_DELETED, at=LATER, task_id="t"),
    )


def test_an_update_that_changes_nothing_makes_no_event() -> None:
    assert steps(touch(task(), LATER, name="t")) == []


def test_a_run_queued_started_and_finished() -> None:
    q = queued()
    assert steps(q) == [("run.queued", "queued")]
    [event] = lifecycle_events(q)
    assert (event.run_id, event.attempt, event.task_status) == (q.run.run_id, 1, "pending")
    assert event.outcome is None and event.exit_code is None and event.duration is None
    started = start_run(q.task, q.run, "w", LATER, lease_until=LATER + LEASE)
    assert steps(started) == [("run.started", "running")]
    finished = finish_run(started.task, started.run, outcome(), LATER)
    assert steps(finished) == [("run.finished", "completed", "completed")]
    [done] = lifecycle_events(finished)
    assert (done.exit_code, done.duration, done.task_status) == (0, 0.5, "completed")


def test_a_failed_attempt_finishes_before_its_retry_is_queued() -> None:
    t, run = running(task(max_attempts=2))
    retried = finish_run(t, run, outcome(3), LATER, entropy=ENTROPY)
    assert steps(retried) == [
        ("run.finished", "failed", "failed"),
        ("run.queued", "queued"),
    ]
    finished, retry = lifecycle_events(retried)
    assert finished.exit_code == 3 and finished.attempt == 1
    assert retry.attempt == 2 and retry.task_status == "pending"


def test_a_lost_run_finishes_lost_then_the_next_attempt_is_queued() -> None:
    t, run = running()
    assert steps(lose_run(t, run, LATER, entropy=ENTROPY)) == [
        ("run.finished", "failed", "lost"),
        ("run.queued", "queued"),
    ]
    last = msgspec.structs.replace(run, attempt=LOST_RUN_LIMIT)
    assert steps(lose_run(t, last, LATER, entropy=ENTROPY)) == [("run.finished", "failed", "lost")]


def test_a_dead_letter_counted_is_bookkeeping_until_the_run_fails() -> None:
    q = queued()
    counted = dead_lettered(q.task, q.run, LATER, resend_at=LATER, entropy=ENTROPY)
    assert steps(counted) == []
    run = msgspec.structs.replace(q.run, dead_letters=DEAD_LETTER_LIMIT - 1)
    failed = dead_lettered(q.task, run, LATER, resend_at=LATER, entropy=ENTROPY)
    assert steps(failed) == [("run.finished", "failed", "not_started")]


def test_cancelling_a_queued_run_finishes_it_cancelled() -> None:
    q = queued()
    assert steps(cancel(q.task, q.run, LATER, entropy=ENTROPY)) == [
        ("run.finished", "cancelled", "cancelled")
    ]


def test_cancelling_a_running_run_is_told_when_its_consumer_stops_it() -> None:
    t, run = running()
    requested = request_cancel(t, LATER)
    assert steps(requested) == [], "the request is for the consumer; the run goes on"
    stopped = cancel_running(requested.task, run, outcome(143), LATER, entropy=ENTROPY)
    assert steps(stopped) == [("run.finished", "cancelled", "cancelled")]


def test_cancelling_a_one_shot_time_updates_the_task() -> None:
    waiting = create(task(scheduled_at=LATER)).task
    [event] = lifecycle_events(cancel(waiting, None, NOW))
    assert (event.type, event.task_status) == ("task.updated", "cancelled")


def test_a_run_given_back_at_shutdown_finishes_and_a_fresh_one_is_queued() -> None:
    t, run = running()
    assert steps(requeue_run(t, run, "shutdown", LATER, entropy=ENTROPY)) == [
        ("run.finished", "cancelled", "cancelled"),
        ("run.queued", "queued"),
    ]


def test_fires_queue_runs_and_missed_fires_finish_skipped() -> None:
    assert steps(fire_schedule(recurring(), NOW, entropy=ENTROPY)) == [("run.queued", "queued")]
    late = NOW + timedelta(minutes=10)
    skipping = recurring(misfire=MisfirePolicy.SKIP, misfire_grace=1)
    assert steps(fire_schedule(skipping, late, entropy=ENTROPY)) == [
        ("run.finished", "skipped", "skipped")
    ]


def test_a_fire_due_while_a_run_ran_is_skipped_after_it_under_overlap_forbid() -> None:
    t, run = running(recurring(overlap=OverlapPolicy.FORBID))
    due_meanwhile = msgspec.structs.replace(t, scheduled_at=NOW + timedelta(seconds=1))
    ended = finish_run(due_meanwhile, run, outcome(), LATER, entropy=ENTROPY)
    assert steps(ended) == [
        ("run.finished", "completed", "completed"),
        ("run.finished", "skipped", "skipped"),
    ]


def test_lease_and_claim_bookkeeping_makes_no_event() -> None:
    t, _ = running()
    assert steps(extend_lease(t, LATER, LATER + LEASE)) == []
    assert steps(restore_entry(create(task(scheduled_at=LATER)).task, NOW)) == []


def test_schedule_changes_update_the_task() -> None:
    t = create(task()).task
    scheduled = recur(t, EVERY, NOW)
    assert steps(scheduled) == [("task.updated",)]
    paused = pause(scheduled.task, LATER)
    assert steps(paused) == [("task.updated",)]
    assert steps(resume(paused.task, LATER)) == [("task.updated",)]
    assert steps(unschedule(scheduled.task, LATER)) == [("task.updated",)]
    assert steps(reschedule(t, LATER, NOW)) == [("task.updated",)]
    assert steps(set_aside(scheduled.task, "no calendar", LATER, entropy=ENTROPY)) == [
        ("task.updated",),
        ("run.finished", "skipped", "skipped"),
    ]


def fired_ahead() -> Transition:
    """A recurring task's fire dispatched before its due time (look-ahead)."""
    return fire_schedule(recurring(scheduled_at=LATER, next_runs=[LATER]), NOW, entropy=ENTROPY)


@pytest.mark.parametrize(
    ("change", "task_step"),
    [
        (lambda t, run: pause(t, NOW, run), [("task.updated",)]),
        (lambda t, run: unschedule(t, NOW, run), [("task.updated",)]),
        (lambda t, run: recur(t, Recurrence(every=30), NOW, run), [("task.updated",)]),
        (lambda t, run: queue_run(t, NOW, run, entropy=ENTROPY), [("run.queued", "queued")]),
    ],
    ids=["pause", "unschedule", "recur", "execute"],
)
def test_a_fire_withdrawn_before_its_time_finishes_skipped(
    change: object, task_step: list[tuple[str, ...]]
) -> None:
    ahead = fired_ahead()
    transition = change(ahead.task, ahead.run)  # type: ignore[operator]
    withdrawn = ("run.finished", "skipped", "skipped")
    if task_step[0][0] == "task.updated":
        assert steps(transition) == [*task_step, withdrawn]
    else:
        assert steps(transition) == [withdrawn, *task_step], "withdrawn, then the new run"


def test_task_change_carries_the_events_of_its_transition() -> None:
    q = queued()
    assert TaskChange.of(q).events == lifecycle_events(q)


def test_events_encode_without_the_fields_that_do_not_apply() -> None:
    [event] = lifecycle_events(delete(task(), NOW))
    assert msgspec.json.decode(msgspec.json.encode(event.logged_as("5-0"))) == {
        "id": "5-0",
        "type": "task.deleted",
        "at": "2026-01-01T00:00:00Z",
        "task_id": "t",
    }


@pytest.mark.parametrize(
    "text", ["", "1", "1-", "-1", "a-b", "1-2-3", " 1-2", "1-99999999999999999999"]
)
def test_an_event_id_is_two_whole_numbers(text: str) -> None:
    with pytest.raises(InvalidEventId):
        event_key(text)


def test_event_ids_sort_by_their_numbers() -> None:
    assert event_key("9-0") < event_key("10-0") < event_key("10-1")

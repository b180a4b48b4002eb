"""Which notifications a transition causes (``notifications_for``), what their bodies say,
and how a delivery's record moves on after each try."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import msgspec

from app.domain import (
    LOST_RUN_LIMIT,
    MisfirePolicy,
    Notify,
    Outcome,
    Recurrence,
    StillRunning,
    Task,
    Transition,
    cancel_running,
    finish_run,
    fire_schedule,
    lose_run,
    pause,
    queue_run,
    start_run,
    timestamp,
)
from app.notifications import (
    DeliveryState,
    Notification,
    NotifyEvent,
    body_of,
    delivered,
    new_entry,
    not_delivered,
    notifications_for,
    retry_delay,
    retryable_status,
    signature,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(seconds=7)
EVERY = Notify(
    on_start="https://h.example/start",
    on_success="https://h.example/success",
    on_failure="https://h.example/failure",
    on_not_started="https://h.example/not-started",
    on_still_running=StillRunning(url="https://h.example/slow", after=60),
    success_ping="https://ping.example/abc",
)


def task(**changes: object) -> Task:
    base = Task(id="t", name="nightly", command="x", created_at=NOW, updated_at=NOW, notify=EVERY)
    return msgspec.structs.replace(base, **changes)


def started(idle: Task) -> Transition:
    queued = queue_run(idle, NOW)
    return start_run(queued.task, queued.run, "w", NOW, lease_until=NOW + timedelta(seconds=30))


def finished(idle: Task, **fields: object) -> Transition:
    running = started(idle)
    outcome = Outcome(exit_code=0, duration=7.0, output="", truncated=False)
    return finish_run(running.task, running.run, msgspec.structs.replace(outcome, **fields), LATER)


def events(transition: Transition) -> list[NotifyEvent]:
    return [n.event for n in notifications_for(transition)]


def test_a_start_notifies_at_once_and_still_running_after_its_delay() -> None:
    start, still = notifications_for(started(task()))
    assert (start.event, start.url, start.due) == (
        NotifyEvent.ON_START,
        "https://h.example/start",
        timestamp(NOW),
    )
    assert (still.event, still.url, still.due) == (
        NotifyEvent.ON_STILL_RUNNING,
        "https://h.example/slow",
        timestamp(NOW) + 60,
    )


def test_a_completed_run_notifies_success_and_the_ping() -> None:
    success, ping = notifications_for(finished(task()))
    assert (success.event, ping.event) == (NotifyEvent.ON_SUCCESS, NotifyEvent.SUCCESS_PING)
    assert (success.run.outcome, success.run.exit_code, success.run.duration) == (
        "completed",
        0,
        7.0,
    )
    assert (success.run.started_at, success.run.finished_at, success.due) == (
        NOW,
        LATER,
        timestamp(LATER),
    )
    assert success.id == "t/" + success.run_id + "/on_success"


def test_a_failed_attempt_with_a_retry_coming_notifies_nothing() -> None:
    assert events(finished(task(max_attempts=2), exit_code=1)) == []


def test_the_last_failed_attempt_notifies_failure() -> None:
    assert events(finished(task(max_attempts=1), exit_code=1)) == [NotifyEvent.ON_FAILURE]
    [timed_out] = notifications_for(finished(task(), exit_code=None, timed_out=True))
    assert (timed_out.event, timed_out.run.outcome) == (NotifyEvent.ON_FAILURE, "timed_out")


def test_a_command_that_could_not_start_notifies_failure_and_not_started() -> None:
    transition = finished(task(), exit_code=None, error="no such file: /bin/nope")
    failure, not_started = notifications_for(transition)
    assert (failure.event, not_started.event) == (
        NotifyEvent.ON_FAILURE,
        NotifyEvent.ON_NOT_STARTED,
    )
    assert failure.run.outcome == "not_started"
    assert failure.run.error == "no such file: /bin/nope"


def test_a_lost_run_notifies_failure_only_once_out_of_attempts() -> None:
    running = started(task())
    assert events(lose_run(running.task, running.run, LATER)) == []  # retried
    last = started(task())
    last_run = msgspec.structs.replace(last.run, attempt=LOST_RUN_LIMIT)
    [failure] = notifications_for(lose_run(last.task, last_run, LATER))
    assert (failure.event, failure.run.outcome) == (NotifyEvent.ON_FAILURE, "lost")


def test_a_cancelled_run_notifies_nothing() -> None:
    running = started(task())
    outcome = Outcome(exit_code=None, duration=1.0, output="", truncated=False)
    assert events(cancel_running(running.task, running.run, outcome, LATER)) == []


def test_a_skipped_fire_notifies_not_started() -> None:
    recurring = task(
        schedule=Recurrence(every=60, start=NOW),
        scheduled_at=NOW,
        misfire=MisfirePolicy.SKIP,
        misfire_grace=1,
    )
    [skipped] = notifications_for(fire_schedule(recurring, NOW + timedelta(seconds=30)))
    assert (skipped.event, skipped.run.outcome) == (NotifyEvent.ON_NOT_STARTED, "skipped")


def test_a_fire_withdrawn_by_a_person_notifies_nothing() -> None:
    due = NOW + timedelta(seconds=1)
    recurring = task(schedule=Recurrence(every=60, start=due), scheduled_at=due)
    ahead = fire_schedule(recurring, NOW)  # dispatched ahead of its due time
    paused = pause(ahead.task, NOW, ahead.run)
    assert [run.status for run in paused.runs] == ["skipped"]
    assert events(paused) == []


def test_a_task_without_notify_or_without_that_event_notifies_nothing() -> None:
    assert events(finished(task(notify=None))) == []
    assert events(finished(task(notify=Notify(on_failure="https://h.example/f")))) == []
    assert events(started(task(notify=Notify(on_success="https://h.example/s")))) == []


def _note(event: NotifyEvent = NotifyEvent.ON_FAILURE) -> Notification:
    [note] = [n for n in notifications_for(finished(task(), exit_code=3)) if n.event == event]
    return note


def test_the_body_names_task_run_outcome_and_links_to_the_run() -> None:
    note = _note()
    body = json.loads(body_of(note, public_url="https://taskq.example/", sent_at=LATER))
    assert body == {
        "event": "on_failure",
        "delivery_id": note.id,
        "sent_at": "2026-01-01T00:00:07Z",
        "task": {"id": "t", "name": "nightly"},
        "run": {
            "id": note.run_id,
            "attempt": 1,
            "outcome": "failed",
            "exit_code": 3,
            "duration": 7.0,
            "started_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:00:07Z",
            "error": None,
            "url": f"https://taskq.example/tasks/t/runs/{note.run_id}",
        },
    }


def test_the_signature_is_the_hmac_of_the_exact_body() -> None:
    body = body_of(_note(), public_url="http://x", sent_at=LATER)
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature(b"s3cret", body) == f"sha256={expected}"


def test_retries_back_off_exponentially_with_jitter_up_to_a_cap() -> None:
    assert [retry_delay(5, attempts, 0) for attempts in (1, 2, 3)] == [5, 10, 20]
    assert retry_delay(5, 1, 1) == 7.5
    assert retry_delay(5, 30, 0) == 3600


def test_only_throttling_and_server_errors_are_worth_retrying() -> None:
    assert [retryable_status(code) for code in (429, 500, 503)] == [True] * 3
    assert [retryable_status(code) for code in (400, 401, 404, 410)] == [False] * 4


def test_a_record_counts_attempts_until_delivered_or_given_up() -> None:
    entry = new_entry(_note())
    once, retry_at = not_delivered(
        entry, "HTTP 500", LATER, retryable=True, max_attempts=3, first_delay=2, jitter=0
    )
    assert (once.record.state, once.record.attempts, retry_at) == (
        DeliveryState.PENDING,
        1,
        timestamp(LATER) + 2,
    )
    done = delivered(once, LATER)
    assert (done.record.state, done.record.attempts, done.record.delivered_at) == (
        DeliveryState.DELIVERED,
        2,
        LATER,
    )
    assert done.record.last_error == "HTTP 500"
    refused, never = not_delivered(
        once, "HTTP 404", LATER, retryable=False, max_attempts=3, first_delay=2, jitter=0
    )
    assert (refused.record.state, never) == (DeliveryState.FAILED, None)
    twice, _ = not_delivered(
        once, "timeout", LATER, retryable=True, max_attempts=3, first_delay=2, jitter=0
    )
    third, gave_up = not_delivered(
        twice, "timeout", LATER, retryable=True, max_attempts=3, first_delay=2, jitter=0
    )
    assert (third.record.state, third.record.attempts, gave_up) == (DeliveryState.FAILED, 3, None)

"""A running task whose run's document cannot be read, and whose worker stopped renewing
its lease (``lose_unreadable_run``): the run is recovered as lost from what the task knows
of it, like any lost run, its document replaced by one saying what was wrong."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from app.domain import (
    LOST_RUN_LIMIT,
    ActiveRun,
    InvalidTransition,
    RunStatus,
    Task,
    TaskStatus,
    Transition,
    UnreadableRun,
    lose_unreadable_run,
    queue_run,
    request_cancel,
    start_run,
)

T0 = datetime(2026, 1, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)
LATER = T0 + timedelta(minutes=5)


def started(attempt: int = 1) -> Transition:
    task = Task(id="t", name="t", command="true", created_at=T0, updated_at=T0)
    queued = queue_run(task, T0)
    run = msgspec.structs.replace(queued.run, attempt=attempt)
    pending = msgspec.structs.replace(
        queued.task, active_run=ActiveRun(run_id=run.run_id, attempt=attempt)
    )
    return start_run(pending, run, "w", T0, lease_until=T0 + LEASE)


def unreadable(run_id: str) -> UnreadableRun:
    return UnreadableRun("t", run_id, "Input data was truncated")


def test_the_run_is_closed_as_lost_and_the_next_attempt_queued() -> None:
    running = started()

    recovered = lose_unreadable_run(running.task, unreadable(running.run.run_id), LATER)

    lost, fresh = recovered.runs
    assert (lost.run_id, lost.attempt) == (running.run.run_id, 1)
    assert lost.status == RunStatus.FAILED and lost.finished_at == LATER
    assert lost.error == (
        "lost: its worker stopped renewing its lease; "
        "its stored document could not be read: Input data was truncated"
    )
    assert recovered.task.status == TaskStatus.PENDING
    assert recovered.task.active_run is not None
    assert (recovered.task.active_run.run_id, fresh.attempt) == (fresh.run_id, 2)
    assert fresh.status == RunStatus.QUEUED


def test_at_the_limit_of_lost_runs_the_task_fails() -> None:
    running = started(attempt=LOST_RUN_LIMIT)

    recovered = lose_unreadable_run(running.task, unreadable(running.run.run_id), LATER)

    [lost] = recovered.runs
    assert lost.status == RunStatus.FAILED
    assert recovered.task.status == TaskStatus.FAILED and recovered.task.active_run is None
    assert recovered.task.last_run is not None
    assert recovered.task.last_run.run_id == lost.run_id


def test_a_cancel_asked_for_meanwhile_closes_it_as_cancelled() -> None:
    running = started()
    asked = request_cancel(running.task, T0 + timedelta(seconds=1)).task

    recovered = lose_unreadable_run(asked, unreadable(running.run.run_id), LATER)

    [closed] = recovered.runs
    assert closed.status == RunStatus.CANCELLED
    assert closed.error is not None
    assert closed.error.endswith("its stored document could not be read: Input data was truncated")
    assert recovered.task.status == TaskStatus.CANCELLED


def test_a_task_not_running_that_run_is_refused() -> None:
    running = started()
    with pytest.raises(InvalidTransition, match="read it again"):
        lose_unreadable_run(running.task, unreadable("some-other-run"), LATER)
    queued = queue_run(Task(id="t", name="t", command="true", created_at=T0, updated_at=T0), T0)
    with pytest.raises(InvalidTransition):
        lose_unreadable_run(queued.task, unreadable(queued.run.run_id), LATER)

"""Cancelling a task whose active run's document cannot be read (``cancel_unreadable``):
a running command is asked to stop; a queued run, which no consumer can start, is closed
from what the task knows of it; anything else is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.domain import (
    InvalidTransition,
    RunStatus,
    Task,
    TaskStatus,
    UnreadableRun,
    cancel_unreadable,
    queue_run,
    start_run,
)

T0 = datetime(2026, 1, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def task() -> Task:
    return Task(id="t", name="t", command="true", created_at=T0, updated_at=T0)


def unreadable(run_id: str) -> UnreadableRun:
    return UnreadableRun("t", run_id, "Input data was truncated")


def test_a_queued_run_is_closed_as_cancelled_saying_what_was_wrong() -> None:
    queued = queue_run(task(), T0)
    later = T0 + timedelta(minutes=5)

    cancelled = cancel_unreadable(queued.task, unreadable(queued.run.run_id), later)

    assert cancelled.task.status == TaskStatus.CANCELLED
    assert cancelled.task.active_run is None
    [run] = cancelled.runs
    assert (run.run_id, run.attempt, run.queued_at) == (queued.run.run_id, 1, T0)
    assert run.status == RunStatus.CANCELLED and run.finished_at == later
    assert run.error == (
        "cancelled; its stored document could not be read: Input data was truncated"
    )
    assert cancelled.task.last_run is not None
    assert cancelled.task.last_run.run_id == run.run_id


def test_a_running_command_is_asked_to_stop() -> None:
    queued = queue_run(task(), T0)
    started = start_run(queued.task, queued.run, "w", T0, lease_until=T0 + LEASE)

    cancelled = cancel_unreadable(started.task, unreadable(queued.run.run_id), T0)

    assert cancelled.task.status == TaskStatus.RUNNING
    assert cancelled.task.cancel_requested
    assert cancelled.runs == ()


def test_a_task_whose_active_run_is_another_is_refused() -> None:
    queued = queue_run(task(), T0)
    with pytest.raises(InvalidTransition, match="read it again"):
        cancel_unreadable(queued.task, unreadable("some-other-run"), T0)
    with pytest.raises(InvalidTransition):
        cancel_unreadable(task(), unreadable("r"), T0)

"""Retries of failed runs: attempts, exponential backoff with jitter, success exit codes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from app.domain import (
    Outcome,
    RunStatus,
    Task,
    TaskStatus,
    finish_run,
    queue_run,
    retry_delay,
    start_run,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def running_task(**changes: object) -> tuple[Task, object]:
    task = Task(id="t", name="t", command="false", created_at=NOW, updated_at=NOW)
    task = msgspec.structs.replace(task, **changes)
    pending, run = queue_run(task, NOW)
    return start_run(pending, run, "w", NOW)


def outcome(exit_code: int | None, **changes: object) -> Outcome:
    return msgspec.structs.replace(
        Outcome(exit_code=exit_code, duration=0.1, output="", truncated=False), **changes
    )


def test_a_failure_with_attempts_left_queues_the_next_attempt_after_a_backoff() -> None:
    task, run = running_task(max_attempts=3, retry_backoff=10)
    waiting, runs = finish_run(task, run, outcome(1), NOW)  # type: ignore[arg-type]
    failed, retry = runs
    assert failed.status == RunStatus.FAILED and failed.attempt == 1
    assert retry.status == RunStatus.QUEUED and retry.attempt == 2
    assert waiting.status == TaskStatus.PENDING
    assert waiting.active_run is not None and waiting.active_run.run_id == retry.run_id
    assert waiting.last_run is not None and waiting.last_run.exit_code == 1
    assert waiting.retry_at is not None
    assert NOW + timedelta(seconds=5) <= waiting.retry_at <= NOW + timedelta(seconds=10)


def test_the_backoff_doubles_and_is_jittered() -> None:
    task = Task(id="t", name="t", command="x", created_at=NOW, updated_at=NOW, retry_backoff=4)
    for attempt, ceiling in ((1, 4), (2, 8), (3, 16), (4, 32)):
        delays = {retry_delay(task, attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1, "jitter spreads tasks that failed together"


def test_the_last_attempt_fails_the_task() -> None:
    task, run = running_task(max_attempts=2)
    first_wait, runs = finish_run(task, run, outcome(1), NOW)  # type: ignore[arg-type]
    retry = runs[1]
    second, started = start_run(first_wait, retry, "w", NOW)
    done, [last] = finish_run(second, started, outcome(2), NOW)
    assert done.status == TaskStatus.FAILED and done.active_run is None
    assert done.retry_at is None
    assert last.attempt == 2 and last.status == RunStatus.FAILED


@pytest.mark.parametrize(
    ("codes", "exit_code", "status"),
    [
        ([0], 0, TaskStatus.COMPLETED),
        ([0], 3, TaskStatus.FAILED),
        ([0, 3], 3, TaskStatus.COMPLETED),
    ],
)
def test_success_exit_codes_decide(codes: list[int], exit_code: int, status: TaskStatus) -> None:
    task, run = running_task(success_exit_codes=codes)
    done, _ = finish_run(task, run, outcome(exit_code), NOW)  # type: ignore[arg-type]
    assert done.status == status


def test_a_timed_out_run_is_never_a_success() -> None:
    task, run = running_task(success_exit_codes=[0, 143])
    done, _ = finish_run(task, run, outcome(143, timed_out=True), NOW)  # type: ignore[arg-type]
    assert done.status == TaskStatus.FAILED

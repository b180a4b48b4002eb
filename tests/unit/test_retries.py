"""Retries of failed runs: attempts, exponential backoff with jitter, success exit codes."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from app.domain import (
    Entropy,
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
LEASE = timedelta(seconds=30)


def running_task(**changes: object) -> tuple[Task, object]:
    task = Task(id="t", name="t", command="false", created_at=NOW, updated_at=NOW)
    task = msgspec.structs.replace(task, **changes)
    queued = queue_run(task, NOW)
    started = start_run(queued.task, queued.run, "w", NOW, lease_until=NOW + LEASE)
    return started.task, started.run


def outcome(exit_code: int | None, **changes: object) -> Outcome:
    return msgspec.structs.replace(
        Outcome(exit_code=exit_code, duration=0.1, output="", truncated=False), **changes
    )


def test_a_failure_with_attempts_left_queues_the_next_attempt_after_a_backoff() -> None:
    task, run = running_task(max_attempts=3, retry_backoff=10)
    retried = finish_run(task, run, outcome(1), NOW)  # type: ignore[arg-type]
    waiting, (failed, retry) = retried.task, retried.runs
    assert failed.status == RunStatus.FAILED and failed.attempt == 1
    assert retry.status == RunStatus.QUEUED and retry.attempt == 2
    assert waiting.status == TaskStatus.PENDING
    assert waiting.active_run is not None and waiting.active_run.run_id == retry.run_id
    assert waiting.last_run is not None and waiting.last_run.exit_code == 1
    assert waiting.retry_at is not None
    assert NOW + timedelta(seconds=10) <= waiting.retry_at <= NOW + timedelta(seconds=15)


class Extreme(random.Random):
    """Randomness stuck at one end of its range."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_the_backoff_doubles_and_is_jittered() -> None:
    task = Task(id="t", name="t", command="x", created_at=NOW, updated_at=NOW, retry_backoff=4)
    for attempt, floor in ((1, 4), (2, 8), (3, 16), (4, 32)):
        delays = {retry_delay(task, attempt) for _ in range(50)}
        assert all(floor <= d <= 1.5 * floor for d in delays)
        assert len(delays) > 1, "jitter spreads tasks that failed together"


@pytest.mark.parametrize(("jitter", "factor"), [(0.0, 1.0), (1.0, 1.5)])
def test_the_backoff_is_a_floor_that_jitter_only_adds_to(jitter: float, factor: float) -> None:
    # `retry_backoff: 0.5` once gave a first retry after 0.39 s: jitter took time off.
    task = Task(id="t", name="t", command="x", created_at=NOW, updated_at=NOW, retry_backoff=0.5)
    entropy = Entropy(Extreme(jitter))
    for attempt, floor in ((1, 0.5), (2, 1.0), (3, 2.0)):
        assert retry_delay(task, attempt, entropy) == pytest.approx(factor * floor)
    # And as the transition schedules it: the retry is due no sooner than the backoff.
    started, run = running_task(max_attempts=2, retry_backoff=0.5)
    waiting = finish_run(started, run, outcome(1), NOW, entropy=entropy).task  # type: ignore[arg-type]
    assert waiting.retry_at == NOW + timedelta(seconds=factor * 0.5)


def test_the_last_attempt_fails_the_task() -> None:
    task, run = running_task(max_attempts=2)
    first_wait = finish_run(task, run, outcome(1), NOW)  # type: ignore[arg-type]
    retry_at = first_wait.task.retry_at
    assert retry_at is not None
    second = start_run(first_wait.task, first_wait.runs[1], "w", retry_at, lease_until=NOW + LEASE)
    ended = finish_run(second.task, second.run, outcome(2), retry_at)
    done, [last] = ended.task, ended.runs
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
    done = finish_run(task, run, outcome(exit_code), NOW).task  # type: ignore[arg-type]
    assert done.status == status


def test_a_timed_out_run_is_never_a_success() -> None:
    task, run = running_task(success_exit_codes=[0, 143])
    done = finish_run(task, run, outcome(143, timed_out=True), NOW).task  # type: ignore[arg-type]
    assert done.status == TaskStatus.FAILED


def test_a_transition_is_deterministic_given_its_inputs_and_a_seeded_entropy() -> None:
    task, run = running_task(max_attempts=2, retry_backoff=10)
    first, second = (
        finish_run(task, run, outcome(1), NOW, entropy=Entropy(random.Random(7)))  # type: ignore[arg-type]
        for _ in range(2)
    )
    assert first == second  # the same retry run id, the same jittered retry time

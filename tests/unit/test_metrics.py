"""What the metrics count for each kind of committed transition, and the life of the
multiprocess directory."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from app.domain import (
    DEAD_LETTER_LIMIT,
    MisfirePolicy,
    Outcome,
    Recurrence,
    Run,
    Task,
    Transition,
    cancel_queued,
    dead_lettered,
    finish_run,
    fire_schedule,
    lose_run,
    queue_run,
    start_run,
)
from app.metrics import count_committed
from app.metrics_directory import MULTIPROCESS_VARIABLE, metrics_directory
from tests.metrics_samples import value

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)


class Counts:
    """The change in a few samples across a block (the registry is the process's own)."""

    NAMES = (
        "taskq_runs_started_total",
        "taskq_run_duration_seconds_count",
        "taskq_run_lateness_seconds_count",
        "taskq_run_lateness_seconds_sum",
    )

    def __init__(self) -> None:
        self._before = self._now()

    @staticmethod
    def _now() -> dict[str, float]:
        samples = {name: value(name) for name in Counts.NAMES}
        for outcome in ("completed", "failed", "timed_out", "cancelled", "skipped", "lost"):
            samples[outcome] = value("taskq_runs_finished_total", outcome=outcome)
        samples["not_started"] = value("taskq_runs_finished_total", outcome="not_started")
        return samples

    def changed(self) -> dict[str, float]:
        return {k: v - self._before[k] for k, v in self._now().items() if v != self._before[k]}


@pytest.fixture
def counts() -> Iterator[Counts]:
    yield Counts()


def idle_task(**fields: object) -> Task:
    task = Task(id="t", name="t", command="x", created_at=NOW, updated_at=NOW)
    return msgspec.structs.replace(task, **fields)


def started(at: datetime = NOW) -> Transition:
    queued = queue_run(idle_task(), NOW)
    return start_run(queued.task, queued.run, "w", at, lease_until=at + LEASE)


def outcome(**fields: object) -> Outcome:
    base = Outcome(exit_code=0, duration=2.0, output="", truncated=False)
    return msgspec.structs.replace(base, **fields)


def test_a_start_counts_once_with_its_lateness(counts: Counts) -> None:
    count_committed(started(NOW + timedelta(seconds=1.5)))
    # Approximately: the sum adds to what earlier tests of this process observed.
    assert counts.changed() == pytest.approx(
        {
            "taskq_runs_started_total": 1,
            "taskq_run_lateness_seconds_count": 1,
            "taskq_run_lateness_seconds_sum": 1.5,
        }
    )


def test_lateness_runs_from_not_before_when_the_run_has_one(counts: Counts) -> None:
    due = NOW + timedelta(seconds=10)
    queued = queue_run(idle_task(), NOW)
    waiting = msgspec.structs.replace(queued.run, not_before=due)
    assert queued.task.active_run is not None
    active = msgspec.structs.replace(queued.task.active_run, not_before=due)
    task = msgspec.structs.replace(queued.task, active_run=active)
    at = due + timedelta(seconds=0.25)
    count_committed(start_run(task, waiting, "w", at, lease_until=at + LEASE))
    assert counts.changed()["taskq_run_lateness_seconds_sum"] == pytest.approx(0.25)


def test_a_start_stamped_before_its_queue_time_is_not_negative_lateness(counts: Counts) -> None:
    # Another machine's clock stamped queued_at, a little ahead of this one's.
    count_committed(started(NOW - timedelta(seconds=3)))
    changed = counts.changed()
    assert changed["taskq_run_lateness_seconds_count"] == 1
    assert "taskq_run_lateness_seconds_sum" not in changed  # observed as 0
    assert value("taskq_run_lateness_seconds_bucket", le="0.005") >= 1


@pytest.mark.parametrize(
    ("result", "counted"),
    [
        (outcome(exit_code=0), "completed"),
        (outcome(exit_code=1), "failed"),
        (outcome(exit_code=None, timed_out=True), "timed_out"),
    ],
)
def test_a_finish_counts_its_outcome_and_duration(
    counts: Counts, result: Outcome, counted: str
) -> None:
    running = started()
    count_committed(finish_run(running.task, running.run, result, NOW))
    assert counts.changed() == {counted: 1, "taskq_run_duration_seconds_count": 1}


def test_a_failure_that_queues_a_retry_counts_the_failure_alone(counts: Counts) -> None:
    queued = queue_run(idle_task(max_attempts=3), NOW)
    running = start_run(queued.task, queued.run, "w", NOW, lease_until=NOW + LEASE)
    retrying = finish_run(running.task, running.run, outcome(exit_code=1), NOW)
    assert len(retrying.runs) == 2  # the failed run and the queued retry
    count_committed(retrying)
    assert counts.changed() == {"failed": 1, "taskq_run_duration_seconds_count": 1}


def test_runs_the_scheduler_ends_count_by_their_outcome(counts: Counts) -> None:
    running = started()
    count_committed(lose_run(running.task, running.run, NOW + LEASE))
    queued = queue_run(idle_task(), NOW)
    count_committed(cancel_queued(queued.task, queued.run, NOW))
    dead = dead_letter_limit_reached(queued.task, queued.run)
    count_committed(dead)
    assert counts.changed() == {"lost": 1, "cancelled": 1, "not_started": 1}


def dead_letter_limit_reached(task: Task, run: Run) -> Transition:
    counted = msgspec.structs.replace(run, dead_letters=DEAD_LETTER_LIMIT - 1)
    return dead_lettered(task, counted, NOW, resend_at=NOW + LEASE)


def test_a_skipped_fire_counts_as_skipped(counts: Counts) -> None:
    late = NOW - timedelta(hours=1)
    task = idle_task(schedule=Recurrence(every=60), scheduled_at=late, misfire=MisfirePolicy.SKIP)
    count_committed(fire_schedule(task, NOW))
    assert counts.changed() == {"skipped": 1}


def test_a_queued_run_and_a_finished_run_written_again_count_nothing(counts: Counts) -> None:
    count_committed(queue_run(idle_task(), NOW))
    running = started()
    finished = finish_run(running.task, running.run, outcome(), NOW)
    count_committed(
        Transition(before=finished.task, after=finished.task, runs=finished.runs, at=NOW)
    )
    assert counts.changed() == {}


def test_a_service_of_one_process_gets_no_directory() -> None:
    with metrics_directory(several_processes=False) as directory:
        assert directory is None
        assert MULTIPROCESS_VARIABLE not in os.environ


def test_a_service_of_several_processes_gets_a_private_directory_removed_after() -> None:
    with metrics_directory(several_processes=True) as directory:
        assert directory is not None
        assert os.environ[MULTIPROCESS_VARIABLE] == directory
        assert Path(directory).is_dir()
        assert not os.listdir(directory)
        (Path(directory) / "counter_1.db").write_bytes(b"")
    assert MULTIPROCESS_VARIABLE not in os.environ
    assert not Path(directory).exists()


def test_a_consumer_process_uses_the_directory_it_inherited(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(MULTIPROCESS_VARIABLE, str(tmp_path))
    with metrics_directory(several_processes=False) as directory:
        assert directory == str(tmp_path)
    assert tmp_path.is_dir()  # its parent's to remove


def test_the_directory_of_a_service_killed_before_it_removed_it_goes_at_the_next_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    with subprocess.Popen(["true"]) as gone:  # a pid that ran and no longer runs
        gone.wait()
    dead = tmp_path / f"taskq-metrics-{gone.pid}-abc"
    alive = tmp_path / f"taskq-metrics-{os.getppid()}-abc"
    other = tmp_path / "taskq-metrics-notapid"
    for path in (dead, alive, other):
        path.mkdir()
    with metrics_directory(several_processes=True) as directory:
        assert directory is not None
        assert Path(directory).name.startswith(f"taskq-metrics-{os.getpid()}-")
        assert not dead.exists()
        assert alive.is_dir() and other.is_dir()

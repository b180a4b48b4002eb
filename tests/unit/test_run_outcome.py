"""How a finished run ended (``run_outcome``), told from the runs the transitions write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from app.domain import (
    DEAD_LETTER_LIMIT,
    Outcome,
    Run,
    RunOutcome,
    Task,
    cancel_running,
    dead_lettered,
    finish_run,
    lose_run,
    queue_run,
    run_outcome,
    start_run,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def idle_task() -> Task:
    return Task(id="t", name="t", command="x", created_at=NOW, updated_at=NOW)


def running() -> tuple[Task, Run]:
    queued = queue_run(idle_task(), NOW)
    started = start_run(queued.task, queued.run, "w", NOW, lease_until=NOW + LEASE)
    return started.task, started.run


def ended_by(outcome: Outcome) -> Run:
    task, run = running()
    return finish_run(task, run, outcome, NOW).runs[0]


def outcome(**fields: object) -> Outcome:
    base = Outcome(exit_code=0, duration=0.1, output="", truncated=False)
    return msgspec.structs.replace(base, **fields)


def test_queued_and_running_runs_have_no_outcome_yet() -> None:
    _, run = running()
    assert run_outcome(run) is None
    assert run_outcome(queue_run(idle_task(), NOW).run) is None


def test_an_exit_code_decides_completed_or_failed() -> None:
    assert run_outcome(ended_by(outcome(exit_code=0))) == RunOutcome.COMPLETED
    assert run_outcome(ended_by(outcome(exit_code=3))) == RunOutcome.FAILED
    killed = outcome(exit_code=137, error="killed by SIGKILL")
    assert run_outcome(ended_by(killed)) == RunOutcome.FAILED


def test_a_time_limit_is_timed_out() -> None:
    timed_out = outcome(exit_code=143, timed_out=True, error="timed out after 1 s")
    assert run_outcome(ended_by(timed_out)) == RunOutcome.TIMED_OUT


def test_a_command_that_could_not_start_is_not_started() -> None:
    no_cwd = outcome(exit_code=None, error="could not start the command: no such directory")
    assert run_outcome(ended_by(no_cwd)) == RunOutcome.NOT_STARTED


def test_a_dispatch_dead_lettered_to_the_limit_is_not_started() -> None:
    queued = queue_run(idle_task(), NOW)
    task, run = queued.task, queued.run
    for _ in range(DEAD_LETTER_LIMIT):
        step = dead_lettered(task, run, NOW, resend_at=NOW)
        task, run = step.after, step.runs[0]
        assert task is not None
    assert run_outcome(run) == RunOutcome.NOT_STARTED


def test_a_run_whose_worker_died_is_lost() -> None:
    task, run = running()
    assert run_outcome(lose_run(task, run, NOW).runs[0]) == RunOutcome.LOST


def test_a_cancelled_run_is_cancelled() -> None:
    task, run = running()
    stopped = outcome(exit_code=None, error="cancelled")
    assert run_outcome(cancel_running(task, run, stopped, NOW).runs[0]) == RunOutcome.CANCELLED

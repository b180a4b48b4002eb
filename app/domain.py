"""The task model and its lifecycle: pure data and pure transitions, no I/O.

Every state change is a function from the current document to the next one; the
store persists it with a compare-and-set on ``revision`` so that a late or duplicate
actor can never overwrite a newer state.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated
from zoneinfo import ZoneInfo

import msgspec
from cronsim import CronSim

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_COMMAND_BYTES = 16 * 1024

TaskId = Annotated[str, msgspec.Meta(pattern=TASK_ID_PATTERN, description="Task id")]


class TaskStatus(StrEnum):
    CREATED = "created"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING})


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    """A fire that did not run: missed by more than the grace time (``misfire: skip``) or
    due while the previous run was still running (``overlap: forbid``)."""


FINISHED_RUN_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.SKIPPED}
)


class MisfirePolicy(StrEnum):
    """What a recurring task does with fires missed by more than its grace time
    (the scheduler was down): run once for all of them, or skip them."""

    COALESCE = "coalesce"
    SKIP = "skip"


class OverlapPolicy(StrEnum):
    """What a fire that comes while the task's previous run is still running does:
    run once right after that run ends, or skip (recorded as a skipped run)."""

    QUEUE = "queue"
    FORBID = "forbid"


class DomainError(Exception):
    """Base class of the errors a caller can act on (the API maps them to 4xx)."""


class TaskNotFound(DomainError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} does not exist")
        self.task_id = task_id


class RunNotFound(DomainError):
    def __init__(self, task_id: str, run_id: str) -> None:
        super().__init__(f"run {run_id!r} of task {task_id!r} does not exist")


class TaskAlreadyExists(DomainError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} already exists")
        self.task_id = task_id


class InvalidTransition(DomainError):
    """The task's current status does not allow the requested operation."""


class InvalidSchedule(DomainError):
    """A schedule that can never fire."""


class RevisionConflict(Exception):
    """The stored document changed since it was read; re-read and try again."""


class RunSummary(msgspec.Struct, kw_only=True):
    """The outcome of a task's most recent finished run."""

    run_id: str
    attempt: int
    status: RunStatus
    exit_code: int | None
    duration: float | None
    finished_at: datetime


class ActiveRun(msgspec.Struct, kw_only=True):
    """The run a pending or running task is working on."""

    run_id: str
    attempt: int


class Recurrence(msgspec.Struct, kw_only=True):
    """A repeating schedule: a cron expression in a timezone, or a fixed interval.

    ``cron`` has 5 fields, or 6 with a leading seconds field (as in Quartz and Dkron);
    it is evaluated in ``timezone``, so a local time that does not exist (spring
    forward) fires at the next valid time and a repeated one (fall back) fires once.
    ``every`` counts seconds from ``start``. Nothing fires before ``start`` or after ``end``.
    """

    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None
    start: datetime | None = None
    end: datetime | None = None


NEXT_RUNS_SHOWN = 5


def next_fires(recurrence: Recurrence, after: datetime, count: int) -> list[datetime]:
    """Up to ``count`` fire times strictly after ``after``, in UTC."""
    fires: list[datetime] = []
    if recurrence.cron is not None:
        begin = after if recurrence.start is None else max(after, recurrence.start - _TICK)
        zone = ZoneInfo(recurrence.timezone)
        for local in CronSim(recurrence.cron, begin.astimezone(zone)):
            if len(fires) == count or (recurrence.end and local > recurrence.end):
                break
            fires.append(local.astimezone(UTC))
    elif recurrence.every is not None:
        anchor = recurrence.start or after
        step = timedelta(seconds=recurrence.every)
        index = int((after - anchor) / step) + 1 if after >= anchor else 0
        while len(fires) < count:
            fire = anchor + index * step
            index += 1
            if recurrence.end and fire > recurrence.end:
                break
            fires.append(fire.astimezone(UTC))
    return fires


_TICK = timedelta(microseconds=1)


class Task(msgspec.Struct, kw_only=True):
    """A task as stored in Redis (``task:{id}``) and returned by the API."""

    id: str
    name: str
    description: str = ""
    command: str | None = None
    args: list[str] | None = None
    env: dict[str, str] = {}
    cwd: str | None = None
    timeout: float | None = None
    max_attempts: int = 1
    retry_backoff: float = 10.0
    success_exit_codes: list[int] = msgspec.field(default_factory=lambda: [0])
    misfire: MisfirePolicy = MisfirePolicy.COALESCE
    misfire_grace: float = 60.0
    overlap: OverlapPolicy = OverlapPolicy.QUEUE
    status: TaskStatus = TaskStatus.CREATED
    created_at: datetime
    updated_at: datetime
    scheduled_at: datetime | None = None
    schedule: Recurrence | None = None
    next_runs: list[datetime] = []
    paused: bool = False
    cancel_requested: bool = False
    last_run: RunSummary | None = None
    active_run: ActiveRun | None = None
    retry_at: datetime | None = None
    revision: int = 0


class Run(msgspec.Struct, kw_only=True):
    """One execution of a task."""

    run_id: str
    task_id: str
    attempt: int
    status: RunStatus
    queued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    duration: float | None = None
    output: str = ""
    truncated: bool = False
    timed_out: bool = False
    error: str | None = None
    worker: str | None = None
    dead_letters: int = 0
    """Times the broker gave up on this run's dispatch message (see ``dead_lettered``)."""


class Outcome(msgspec.Struct, kw_only=True):
    """What executing a command produced."""

    exit_code: int | None
    duration: float
    output: str
    truncated: bool
    timed_out: bool = False
    error: str | None = None

    def succeeded(self, success_exit_codes: Sequence[int] = (0,)) -> bool:
        return self.exit_code in success_exit_codes and not self.timed_out and self.error is None


def utcnow() -> datetime:
    return datetime.now(UTC)


def timestamp(moment: datetime) -> float:
    """Unix seconds, the score of ``scheduled_tasks``."""
    return moment.timestamp()


def new_task_id() -> str:
    return f"task-{secrets.token_hex(8)}"


_last_run_micros = 0


def new_run_id() -> str:
    """A run id that sorts in creation order: microseconds (strictly increasing within a
    process), then randomness so that ids from different processes never collide."""
    global _last_run_micros
    _last_run_micros = max(time.time_ns() // 1000, _last_run_micros + 1)
    return f"{_last_run_micros:014x}-{secrets.token_hex(4)}"


def worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


def _advance(task: Task, now: datetime, **changes: object) -> Task:
    return msgspec.structs.replace(task, updated_at=now, revision=task.revision + 1, **changes)


def _pending_with_new_run(task: Task, attempt: int, now: datetime) -> tuple[Task, Run]:
    run = Run(
        run_id=new_run_id(),
        task_id=task.id,
        attempt=attempt,
        status=RunStatus.QUEUED,
        queued_at=now,
    )
    active = ActiveRun(run_id=run.run_id, attempt=run.attempt)
    return _advance(task, now, status=TaskStatus.PENDING, active_run=active), run


def queue_run(task: Task, now: datetime) -> tuple[Task, Run]:
    """Put an idle task in ``pending`` with a new queued run."""
    if task.status in ACTIVE_STATUSES:
        raise InvalidTransition(f"task {task.id!r} is already {task.status}")
    return _pending_with_new_run(task, 1, now)


def fire_schedule(task: Task, now: datetime) -> tuple[Task, Run]:
    """Queue the run a due ``scheduled_at`` asks for.

    A one-shot time is consumed; a recurrence moves on to its next fire time after
    ``now``, so fires missed while nothing ran (downtime) give one run, not one each.
    A recurring task with ``misfire: skip`` whose fire is later than its grace time
    runs nothing: the returned run is ``skipped`` and the task waits for its next fire.
    """
    assert task.scheduled_at is not None
    upcoming = [] if task.schedule is None else next_fires(task.schedule, now, NEXT_RUNS_SHOWN)
    scheduled_at = upcoming[0] if upcoming else None
    late = (now - task.scheduled_at).total_seconds()
    skips = task.misfire == MisfirePolicy.SKIP and late > task.misfire_grace
    if task.schedule is not None and skips:
        reason = (
            f"misfire: the fire due at {_iso(task.scheduled_at)} came {late:.0f} s late "
            f"(grace {task.misfire_grace:g} s); it and any later missed fires were skipped"
        )
        skipped = _skipped_run(task, task.scheduled_at, reason, now)
        return _advance(task, now, scheduled_at=scheduled_at, next_runs=upcoming), skipped
    queued, run = queue_run(task, now)
    return msgspec.structs.replace(queued, scheduled_at=scheduled_at, next_runs=upcoming), run


def _skipped_run(task: Task, due: datetime, reason: str, now: datetime) -> Run:
    return Run(
        run_id=new_run_id(),
        task_id=task.id,
        attempt=1,
        status=RunStatus.SKIPPED,
        queued_at=due,
        finished_at=now,
        error=reason,
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _end_overlap(task: Task, ended: Run, now: datetime) -> tuple[Task, list[Run]]:
    """Settle a fire that came due while ``ended`` ran, now that the task is idle again.

    ``overlap: queue`` runs it now (it is not a misfire: the scheduler was not late);
    ``overlap: forbid`` skips it, records a skipped run and waits for the next fire.
    """
    due = task.scheduled_at
    if due is None or due > now or task.paused:
        return task, []
    if task.overlap == OverlapPolicy.QUEUE:
        upcoming = [now, *(fire for fire in task.next_runs if fire > now)]
        return msgspec.structs.replace(task, scheduled_at=now, next_runs=upcoming), []
    upcoming = [] if task.schedule is None else next_fires(task.schedule, now, NEXT_RUNS_SHOWN)
    reason = f"overlap: due at {_iso(due)} while run {ended.run_id} had not ended"
    skipped = _skipped_run(task, due, reason, now)
    waiting = msgspec.structs.replace(
        task, scheduled_at=upcoming[0] if upcoming else None, next_runs=upcoming
    )
    return waiting, [skipped]


def start_run(task: Task, run: Run, worker: str, now: datetime) -> tuple[Task, Run]:
    """A worker takes a queued run."""
    if task.status != TaskStatus.PENDING or task.active_run is None:
        raise InvalidTransition(f"task {task.id!r} is {task.status}, not pending")
    if task.active_run.run_id != run.run_id or run.status != RunStatus.QUEUED:
        raise InvalidTransition(f"run {run.run_id!r} is not the queued run of {task.id!r}")
    started = msgspec.structs.replace(run, status=RunStatus.RUNNING, started_at=now, worker=worker)
    return _advance(task, now, status=TaskStatus.RUNNING, retry_at=None), started


def retry_delay(task: Task, attempt: int) -> float:
    """Seconds before the attempt after ``attempt``: exponential, with equal jitter so that
    tasks failing together do not retry together."""
    ceiling = task.retry_backoff * 2 ** (attempt - 1)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _require_running(task: Task, run: Run) -> None:
    if (
        task.status != TaskStatus.RUNNING
        or task.active_run is None
        or task.active_run.run_id != run.run_id
    ):
        raise InvalidTransition(f"run {run.run_id!r} is not the running run of {task.id!r}")


def _summary_of(run: Run) -> RunSummary:
    """The ``last_run`` of a task, from its run that just ended."""
    assert run.finished_at is not None
    return RunSummary(
        run_id=run.run_id,
        attempt=run.attempt,
        status=run.status,
        exit_code=run.exit_code,
        duration=run.duration,
        finished_at=run.finished_at,
    )


def finish_run(task: Task, run: Run, outcome: Outcome, now: datetime) -> tuple[Task, list[Run]]:
    """Record a run's outcome: ``completed`` when the exit code is one of the task's
    success codes; otherwise the next attempt is queued after a backoff while attempts
    are left (the task stays ``pending``, ``retry_at`` says when), else ``failed``.

    Returns the task and the runs to write (the finished one, and a queued retry if any).
    """
    _require_running(task, run)
    succeeded = outcome.succeeded(task.success_exit_codes)
    run_status = RunStatus.COMPLETED if succeeded else RunStatus.FAILED
    finished = msgspec.structs.replace(
        run,
        status=run_status,
        finished_at=now,
        exit_code=outcome.exit_code,
        duration=outcome.duration,
        output=outcome.output,
        truncated=outcome.truncated,
        timed_out=outcome.timed_out,
        error=outcome.error,
    )
    return _after_attempt(task, finished, succeeded, now)


def _after_attempt(
    task: Task, ended: Run, succeeded: bool, now: datetime
) -> tuple[Task, list[Run]]:
    """The task once the attempt ``ended``: a failed one with attempts left queues the
    next attempt after a backoff (the task stays ``pending``, ``retry_at`` says when);
    otherwise the task is ``completed`` or ``failed``.

    Returns the task and the runs to write (the ended one, then a queued retry or a
    skipped fire).
    """
    summary = _summary_of(ended)
    if not succeeded and ended.attempt < task.max_attempts:
        pending, retry = _pending_with_new_run(task, ended.attempt + 1, now)
        retry_at = now + timedelta(seconds=retry_delay(task, ended.attempt))
        waiting = msgspec.structs.replace(
            pending, last_run=summary, retry_at=retry_at, cancel_requested=False
        )
        return waiting, [ended, retry]
    task_status = TaskStatus.COMPLETED if succeeded else TaskStatus.FAILED
    done = _advance(
        task, now, status=task_status, last_run=summary, active_run=None, cancel_requested=False
    )
    idle, skipped = _end_overlap(done, ended, now)
    return idle, [ended, *skipped]


DEAD_LETTER_LIMIT = 3
"""Times the dispatch of one queued run may be dead-lettered (and sent again) before the
run fails: consumers that keep stopping before they start it should not fail a task at
once, consumers that can never start it should not loop for ever."""
DEAD_LETTERED_REASON = (
    f"dead-lettered {DEAD_LETTER_LIMIT} times: its dispatch message kept going back to the "
    "queue without the run starting (consumers stopped or died before starting it)"
)


def dead_lettered(task: Task, run: Run, now: datetime) -> tuple[Task, list[Run]]:
    """The broker gave up on the dispatch message of a queued run. The run counts it and
    stays queued, to be dispatched again; at ``DEAD_LETTER_LIMIT`` it fails, and the task
    goes on as after any failed attempt (``active_run`` then is no longer ``run``)."""
    if (
        task.status != TaskStatus.PENDING
        or task.active_run is None
        or task.active_run.run_id != run.run_id
        or run.status != RunStatus.QUEUED
    ):
        raise InvalidTransition(f"run {run.run_id!r} is not the queued run of {task.id!r}")
    counted = msgspec.structs.replace(run, dead_letters=run.dead_letters + 1)
    if counted.dead_letters < DEAD_LETTER_LIMIT:
        return _advance(task, now), [counted]
    failed = msgspec.structs.replace(
        counted, status=RunStatus.FAILED, finished_at=now, error=DEAD_LETTERED_REASON
    )
    return _after_attempt(task, failed, False, now)


CANCELLED_REASON = "cancelled"


def cancel_queued(task: Task, run: Run, now: datetime) -> tuple[Task, list[Run]]:
    """Cancel a pending task: its queued run never starts."""
    if task.status != TaskStatus.PENDING or task.active_run is None:
        raise InvalidTransition(f"task {task.id!r} is {task.status}, not pending")
    return _close_cancelled(task, run, now)


def request_cancel(task: Task, now: datetime) -> Task:
    """Ask the consumer running the task to stop it (it records the cancellation)."""
    if task.status != TaskStatus.RUNNING:
        raise InvalidTransition(f"task {task.id!r} is {task.status}, not running")
    return _advance(task, now, cancel_requested=True)


def cancel_running(task: Task, run: Run, outcome: Outcome, now: datetime) -> tuple[Task, list[Run]]:
    """Record a running run stopped on request, with what it printed until then."""
    _require_running(task, run)
    stopped = msgspec.structs.replace(
        run,
        exit_code=outcome.exit_code,
        duration=outcome.duration,
        output=outcome.output,
        truncated=outcome.truncated,
    )
    return _close_cancelled(task, stopped, now)


def _close_cancelled(task: Task, run: Run, now: datetime) -> tuple[Task, list[Run]]:
    """Close ``run`` as cancelled; returns the task and the runs to write (the closed one,
    then a skipped fire if one came due meanwhile under ``overlap: forbid``)."""
    closed = msgspec.structs.replace(
        run, status=RunStatus.CANCELLED, finished_at=now, error=CANCELLED_REASON
    )
    summary = _summary_of(closed)
    cancelled = _advance(
        task,
        now,
        status=TaskStatus.CANCELLED,
        active_run=None,
        last_run=summary,
        retry_at=None,
        cancel_requested=False,
    )
    idle, skipped = _end_overlap(cancelled, closed, now)
    return idle, [closed, *skipped]


def requeue_run(task: Task, run: Run, reason: str, now: datetime) -> tuple[Task, Run, Run]:
    """Give back a run this worker could not finish (shutdown): close it, queue a fresh one.

    Returns the task, the closed run and the new queued run.
    """
    if task.active_run is None or task.active_run.run_id != run.run_id:
        raise InvalidTransition(f"run {run.run_id!r} is not the active run of {task.id!r}")
    closed = msgspec.structs.replace(run, status=RunStatus.CANCELLED, finished_at=now, error=reason)
    pending, fresh = _pending_with_new_run(task, run.attempt, now)
    return pending, closed, fresh


LOST_RUN_LIMIT = 3
"""Attempts a task gets when its runs keep being lost (their worker dies mid-run)."""


def lose_run(task: Task, run: Run, now: datetime) -> tuple[Task, list[Run]]:
    """A run whose worker stopped renewing its lease: close it as failed, then queue the
    next attempt, or fail the task once ``LOST_RUN_LIMIT`` attempts were made.

    Returns the task and the runs to write (the lost one, and the new queued one if any).
    """
    _require_running(task, run)
    if task.cancel_requested:
        return _close_cancelled(task, run, now)
    reason = f"lost: worker {run.worker} stopped renewing its lease"
    lost = msgspec.structs.replace(run, status=RunStatus.FAILED, finished_at=now, error=reason)
    if run.attempt < LOST_RUN_LIMIT:
        pending, fresh = _pending_with_new_run(task, run.attempt + 1, now)
        return pending, [lost, fresh]
    summary = _summary_of(lost)
    failed = _advance(task, now, status=TaskStatus.FAILED, last_run=summary, active_run=None)
    idle, skipped = _end_overlap(failed, lost, now)
    return idle, [lost, *skipped]


def reschedule(task: Task, at: datetime, now: datetime) -> Task:
    """Run once at ``at`` (replacing any recurrence)."""
    return _advance(task, now, scheduled_at=at, schedule=None, next_runs=[at], paused=False)


def recur(task: Task, recurrence: Recurrence, now: datetime) -> Task:
    """Run on ``recurrence`` from now on; raises ``InvalidSchedule`` if it never fires."""
    upcoming = next_fires(recurrence, now, NEXT_RUNS_SHOWN)
    if not upcoming:
        raise InvalidSchedule("the schedule never fires after now (is `end` in the past?)")
    return _advance(task, now, scheduled_at=upcoming[0], schedule=recurrence, next_runs=upcoming)


def due_after_run(task: Task) -> datetime | None:
    """When the task is due next once a run of it ended: its retry, or its next scheduled
    time (unless paused), or never."""
    if task.retry_at is not None:
        return task.retry_at
    if task.scheduled_at is not None and not task.paused:
        return task.scheduled_at
    return None


def pause(task: Task, now: datetime) -> Task:
    """Stop scheduled fires until ``resume``; running it by hand still works."""
    if task.scheduled_at is None:
        raise InvalidTransition(f"task {task.id!r} has no schedule to pause")
    return _advance(task, now, paused=True)


def resume(task: Task, now: datetime) -> Task:
    """Fire on schedule again: a recurrence goes on from now (fires missed while paused
    are skipped); a one-shot time that passed meanwhile fires at once."""
    if not task.paused:
        raise InvalidTransition(f"task {task.id!r} is not paused")
    if task.schedule is not None:
        return msgspec.structs.replace(recur(task, task.schedule, now), paused=False)
    return _advance(task, now, paused=False)


def unschedule(task: Task, now: datetime) -> Task:
    """No more scheduled runs (a run already queued or running is not affected)."""
    return _advance(task, now, scheduled_at=None, schedule=None, next_runs=[], paused=False)


def touch(task: Task, now: datetime, **changes: object) -> Task:
    """Any other change to the document (an update from the API)."""
    return _advance(task, now, **changes)

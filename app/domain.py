"""The task model and its lifecycle: pure data and pure transitions, no I/O.

Every state change is a function from the current document to a ``Transition``: the
next document, the runs to write and the task's entry in ``scheduled_tasks``, whole, so
that each rule lives here and callers only commit it. The store persists it with a
compare-and-set on ``revision``, so that a late or duplicate actor can never overwrite
a newer state. Time comes in as ``now`` and chance (ids, jitter) from an ``Entropy``:
given those, a transition is deterministic (``utcnow`` and ``ENTROPY`` are only the
defaults the roles inject).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated
from zoneinfo import ZoneInfo

import msgspec
from cronsim import CronSim

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$(?!\n)"  # (?!\n): a full match
MAX_COMMAND_BYTES = 16 * 1024

TaskId = Annotated[str, msgspec.Meta(pattern=TASK_ID_PATTERN, description="Task id")]

DEFAULT_QUEUE = "default"
"""The queue (worker pool) a task goes to unless it names another."""
QUEUE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$(?!\n)"  # (?!\n): a full match


class TaskStatus(StrEnum):
    CREATED = "created"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


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


class RunOutcome(StrEnum):
    """How a finished run ended, finer than its status: what metrics count, events
    report and notifications are sent for."""

    COMPLETED = "completed"
    FAILED = "failed"
    """The command ran and exited with a code the task does not count as success."""
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    LOST = "lost"
    """Its worker stopped renewing the run's lease (died, or lost the store) mid-run."""
    NOT_STARTED = "not_started"
    """The command could not be started (no such program or cwd, ...), or its dispatch
    kept being dead-lettered: it never ran."""


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
    """Base class of the errors a caller can act on (the API maps them to 4xx, but
    ``UnreadableTask`` and ``UnreadableRun``: the fault is in the store, not in the
    request)."""


class TaskNotFound(DomainError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} does not exist")
        self.task_id = task_id


class UnreadableTask(DomainError):
    """The task is stored, but its document cannot be read (a hand edit in Redis, or a
    version of taskq that wrote another format). It is neither a task nor gone: nothing
    can be planned from it, and only deleting it works (``document`` is the bytes stored,
    for a delete that checks they are still there); ``reason`` says what is wrong."""

    def __init__(self, task_id: str, document: bytes, reason: str) -> None:
        super().__init__(
            f"task {task_id!r} is stored, but its document cannot be read (corrupted, or "
            "written by another version of taskq); it can only be deleted"
        )
        self.task_id = task_id
        self.document = document
        self.reason = reason


class UnreadableRun(DomainError):
    """The run is stored, but its document cannot be read (a hand edit in Redis, or a
    version of taskq that wrote another format). It is neither a run nor gone: a read of
    that one run says so, a listing of runs leaves it out and names it; ``reason`` says
    what is wrong with it."""

    def __init__(self, task_id: str, run_id: str, reason: str) -> None:
        super().__init__(
            f"run {run_id!r} of task {task_id!r} is stored, but its document cannot be "
            "read (corrupted, or written by another version of taskq)"
        )
        self.task_id = task_id
        self.run_id = run_id
        self.reason = reason


class RunNotFound(DomainError):
    def __init__(self, task_id: str, run_id: str) -> None:
        super().__init__(f"run {run_id!r} of task {task_id!r} does not exist")


class TaskAlreadyExists(DomainError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} already exists")
        self.task_id = task_id


class InvalidTransition(DomainError):
    """The task's current status does not allow the requested operation."""


class NotDueYet(InvalidTransition):
    """A queued run was asked to start before its ``not_before``: wait until then."""

    def __init__(self, run: Run, not_before: datetime) -> None:
        super().__init__(
            f"run {run.run_id!r} of {run.task_id!r} is not due before {_iso(not_before)}"
        )
        self.not_before = not_before


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
    not_before: datetime | None = None
    """When a queued run may start, if later than when it was queued: the due time of a
    scheduled fire dispatched ahead of it (look-ahead dispatch), or a retry's time."""


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


# No whitespace or control characters (no newline: `$(?!\n)`), a host before any path.
WEBHOOK_URL_PATTERN = r"^https?://[^\s/?#\x00-\x1f\x7f]+(?:[/?#][^\s\x00-\x1f\x7f]*)?$(?!\n)"
MAX_WEBHOOK_URL = 2048
MAX_STILL_RUNNING_AFTER = 7 * 86400
WebhookUrl = Annotated[
    str,
    msgspec.Meta(
        min_length=8,
        max_length=MAX_WEBHOOK_URL,
        pattern=WEBHOOK_URL_PATTERN,
        description="An http:// or https:// URL",
    ),
]


class StillRunning(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Notify ``url`` once when a run is still running ``after`` seconds after it started."""

    url: WebhookUrl
    after: Annotated[float, msgspec.Meta(gt=0, le=MAX_STILL_RUNNING_AFTER)]


class Notify(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Where to send a task's notifications (webhooks), each optional; see
    ``app.notifications`` for when each one is sent."""

    on_start: WebhookUrl | None = None
    on_success: WebhookUrl | None = None
    on_failure: WebhookUrl | None = None
    on_not_started: WebhookUrl | None = None
    on_still_running: StillRunning | None = None
    success_ping: WebhookUrl | None = None


MAX_CHAIN_TARGETS = 32
ChainTargets = Annotated[
    list[TaskId],
    msgspec.Meta(
        max_length=MAX_CHAIN_TARGETS,
        description="Task ids, each at most once",
        extra_json_schema={"uniqueItems": True},
    ),
]


class Chain(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """The tasks a task's run queues when it ends for good (after its last attempt): on
    success, or on failure; see ``app.chains``. (``notify.on_success`` is a webhook.)"""

    on_success: ChainTargets = []
    on_failure: ChainTargets = []

    def __post_init__(self) -> None:
        for name, targets in (("on_success", self.on_success), ("on_failure", self.on_failure)):
            if len(set(targets)) < len(targets):
                raise ValueError(f"chain.{name} names a task more than once")


class TriggeredBy(msgspec.Struct, frozen=True, kw_only=True):
    """The run whose end queued this one (``chain``)."""

    task_id: str
    run_id: str
    hops: int = 1
    """Chain steps from a run no chain queued to this one: 1 for a run that such a
    run's end triggered, one more at each step after (documents written before this
    field read as 1)."""


class ChainOutcome(StrEnum):
    """What a run's end did to one of its chain's targets."""

    QUEUED = "queued"
    """A run of the target was queued."""
    DEFERRED = "deferred"
    """The target was busy (``overlap: queue``): it runs once its active run has ended."""
    SKIPPED = "skipped"
    """The target was busy (``overlap: forbid``, or a triggered run already waits)."""
    MISSING = "missing"
    """The target no longer exists."""
    STOPPED = "stopped"
    """Not triggered: the chain had gone on for more steps than a chain may reach
    tasks, so it loops (two updates at once can close a loop neither one's check saw)."""


class ChainTriggered(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One target a run's end triggered, and what became of it."""

    task_id: str
    outcome: ChainOutcome
    run_id: str | None = None
    """The target's run queued (or skipped) for it."""


class Fire(msgspec.Struct, frozen=True, kw_only=True):
    """A time a task is due to run: a scheduled fire, or a failed run's retry."""

    due_at: datetime
    retry: bool = False


_EXPANSION_STEP = 16
"""Fire times computed at once at most while expanding a recurrence (from 1, doubling:
most readers of a task's fires need its first one only, and cron arithmetic is slow)."""


def coming_fires(task: Task, start: datetime) -> Iterator[Fire]:
    """The task's fires at or after ``start``, in time order, from its document alone.

    A queued run waiting for its time comes first: a retry at ``retry_at`` (recurrence
    fires before it are not listed: the task is busy until its retry has run, and its
    ``overlap`` policy decides then), or a fire dispatched ahead at its ``not_before``.
    Then, unless paused, ``scheduled_at`` and the recurrence's fires after it, within
    its ``start``/``end``. Lazy: a recurrence is expanded only as far as it is read.
    """
    floor = start
    active = task.active_run
    if task.status == TaskStatus.PENDING and active and active.not_before is not None:
        retry = task.retry_at is not None
        if active.not_before >= start:
            yield Fire(due_at=active.not_before, retry=retry)
        if retry:
            floor = max(floor, active.not_before + _TICK)
    if task.paused or task.scheduled_at is None:
        return
    if task.scheduled_at >= floor:
        yield Fire(due_at=task.scheduled_at)
    if task.schedule is not None:
        yield from _recurring_fires(task.schedule, max(task.scheduled_at, floor - _TICK))


def _recurring_fires(recurrence: Recurrence, after: datetime) -> Iterator[Fire]:
    step = 1
    while fires := next_fires(recurrence, after, step):
        yield from (Fire(due_at=fire) for fire in fires)
        if len(fires) < step:
            return
        after, step = fires[-1], min(2 * step, _EXPANSION_STEP)


class TaskView(msgspec.Struct, kw_only=True):
    """A task as the API shows it: everything stored but the workers' own bookkeeping."""

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
    queue: str = DEFAULT_QUEUE
    """The queue its runs are dispatched to: only consumers serving it run them."""
    status: TaskStatus = TaskStatus.CREATED
    created_at: datetime
    updated_at: datetime
    scheduled_at: datetime | None = None
    schedule: Recurrence | None = None
    next_runs: list[datetime] = []
    paused: bool = False
    last_run: RunSummary | None = None
    active_run: ActiveRun | None = None
    retry_at: datetime | None = None
    notify: Notify | None = None
    chain: Chain | None = None
    revision: int = 0


class Task(TaskView, kw_only=True):
    """A task as stored in Redis (``task:{id}``)."""

    cancel_requested: bool = False
    """A cancel was asked for while it ran: its consumer stops the command. Internal: the
    API does not show it."""
    chain_waiting: TriggeredBy | None = None
    """A chain triggered the task while it was busy (``overlap: queue``): a run is queued
    for it once the active run ends (``app.chains``). Internal."""


class Run(msgspec.Struct, kw_only=True):
    """One execution of a task."""

    run_id: str
    task_id: str
    attempt: int
    status: RunStatus
    queued_at: datetime
    not_before: datetime | None = None
    """The run never starts before this (see ``ActiveRun.not_before``)."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    duration: float | None = None
    output: str = ""
    truncated: bool = False
    timed_out: bool = False
    error: str | None = None
    worker: str | None = None
    queue: str = DEFAULT_QUEUE
    """The queue the run was dispatched to (its task's when it was queued)."""
    dead_letters: int = 0
    """Times the broker gave up on this run's dispatch message (see ``dead_lettered``)."""
    triggered_by: TriggeredBy | None = None
    """The run of another task whose end queued this one (``chain``); its later attempts
    (retries, runs lost or given back) carry it on."""
    triggered: list[ChainTriggered] = []
    """What this run's end did to the targets of the task's ``chain``."""


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


def run_outcome(run: Run) -> RunOutcome | None:
    """How ``run`` ended; ``None`` while it is queued or running."""
    match run.status:
        case RunStatus.QUEUED | RunStatus.RUNNING:
            return None
        case RunStatus.COMPLETED:
            return RunOutcome.COMPLETED
        case RunStatus.CANCELLED:
            return RunOutcome.CANCELLED
        case RunStatus.SKIPPED:
            return RunOutcome.SKIPPED
        case RunStatus.FAILED:
            if run.timed_out:
                return RunOutcome.TIMED_OUT
            if run.error is not None and run.error.startswith(LOST_REASON_PREFIX):
                return RunOutcome.LOST
            if run.exit_code is None and run.error is not None:
                return RunOutcome.NOT_STARTED  # no exit code: no process ever ran
            return RunOutcome.FAILED


def started_runs(transition: Transition) -> list[Run]:
    """The runs ``transition`` starts: its task's queued run, taken by a worker."""
    before = transition.before
    if before is None or before.active_run is None:
        return []
    active = before.active_run.run_id
    return [r for r in transition.runs if r.status == RunStatus.RUNNING and r.run_id == active]


def ended_runs(transition: Transition) -> list[Run]:
    """The runs ``transition`` ends: its task's active run when it closes it, and the
    fires it skips (written already skipped). A finished run written again is not one."""
    before = transition.before
    active = None if before is None or before.active_run is None else before.active_run.run_id
    return [
        run
        for run in transition.runs
        if run.status in FINISHED_RUN_STATUSES
        and (run.run_id == active or run.status == RunStatus.SKIPPED)
    ]


def utcnow() -> datetime:
    """The wall clock, in UTC: the default ``clock`` of every role."""
    return datetime.now(UTC)


def timestamp(moment: datetime) -> float:
    """Unix seconds, the score of ``scheduled_tasks``."""
    return moment.timestamp()


def worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


class Entropy:
    """Where the domain's chance comes from: ids and retry jitter.

    Transitions take one (the shared ``ENTROPY`` by default), so that given their
    inputs and a seeded ``Entropy`` they are deterministic.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.SystemRandom()
        self._last_micros = 0

    def task_id(self) -> str:
        return f"task-{self._rng.getrandbits(64):016x}"

    def run_id(self, now: datetime) -> str:
        """A run id that sorts in creation order: the microsecond of ``now`` (strictly
        increasing for one ``Entropy``), then randomness so that ids drawn in different
        processes never collide."""
        micros = max((now - _EPOCH) // _TICK, self._last_micros + 1)
        self._last_micros = micros
        return f"{micros:014x}-{self._rng.getrandbits(32):08x}"

    def jitter(self) -> float:
        """A fraction in [0, 1]."""
        return self._rng.random()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ENTROPY = Entropy()


class Keep(msgspec.Struct, frozen=True):
    """Leave the task's entry in ``scheduled_tasks`` as it is."""


class Unschedule(msgspec.Struct, frozen=True):
    """Remove the task's entry from ``scheduled_tasks``."""


class DueAt(msgspec.Struct, frozen=True):
    """Set the task's entry in ``scheduled_tasks`` to ``when`` (unix seconds)."""

    when: float


KEEP = Keep()
UNSCHEDULE = Unschedule()
ScheduleChange = Keep | Unschedule | DueAt


def due_at(moment: datetime | None) -> ScheduleChange:
    """The ``scheduled_tasks`` entry of a task next due at ``moment`` (none for ``None``)."""
    return UNSCHEDULE if moment is None else DueAt(timestamp(moment))


@dataclass(frozen=True, slots=True)
class Transition:
    """One step of a task's life, whole: what the store commits at once or not at all.

    ``before`` is the document it was computed from (``None``: a new task), ``after``
    the next one (``None``: the task is deleted), ``runs`` the run records to write and
    ``schedule`` what becomes of the task's entry in ``scheduled_tasks``: its next due
    time, or while a run is active, that run's dispatch claim or lease. ``at`` is when
    it happens (the ``now`` it was computed for).
    """

    before: Task | None
    after: Task | None
    runs: tuple[Run, ...] = ()
    schedule: ScheduleChange = KEEP
    at: datetime = field(kw_only=True)

    @property
    def task_id(self) -> str:
        task = self.after or self.before
        assert task is not None
        return task.id

    @property
    def task(self) -> Task:
        """The next document (a deletion has none)."""
        assert self.after is not None
        return self.after

    @property
    def run(self) -> Run:
        """The first run written."""
        return self.runs[0]


def _step(
    before: Task | None, after: Task, runs: Sequence[Run] = (), schedule: ScheduleChange = KEEP
) -> Transition:
    # Every step sets ``updated_at`` to its ``now`` (a new task: to its creation time).
    return Transition(
        before=before,
        after=_settled(after),
        runs=tuple(runs),
        schedule=schedule,
        at=after.updated_at,
    )


def waits_for_one_shot(task: Task) -> bool:
    """Whether a run of the task is coming at a one-shot time and none is active."""
    return (
        task.active_run is None
        and task.schedule is None
        and task.scheduled_at is not None
        and not task.paused
    )


def _settled(task: Task) -> Task:
    """``task`` with the status its state implies when no run is active: ``pending``
    while it waits for a one-shot time (a run is coming); once it stops waiting, what
    its last run left (``created`` if none). A recurring task keeps its status between
    fires."""
    if task.active_run is not None:
        return task
    if waits_for_one_shot(task):
        return msgspec.structs.replace(task, status=TaskStatus.PENDING)
    if task.status == TaskStatus.PENDING:
        return msgspec.structs.replace(task, status=_last_outcome(task))
    return task


def _last_outcome(task: Task) -> TaskStatus:
    outcomes = {
        RunStatus.COMPLETED: TaskStatus.COMPLETED,
        RunStatus.FAILED: TaskStatus.FAILED,
        RunStatus.CANCELLED: TaskStatus.CANCELLED,
    }
    last = task.last_run
    return TaskStatus.CREATED if last is None else outcomes.get(last.status, TaskStatus.CREATED)


def _entry_unless_busy(task: Task, after: Task) -> ScheduleChange:
    """The entry of a task whose schedule changed: its next due time, unless a run is
    active: the entry is then that run's (dispatch claim or lease), and what is due next
    becomes due when the run ends."""
    if task.active_run is not None:
        return KEEP
    return due_at(None if after.paused else after.scheduled_at)


def _entry_after_run(task: Task) -> ScheduleChange:
    """After a run its lease entry goes; what is due next takes its place: its retry,
    or its next scheduled time (unless paused), or nothing."""
    if task.retry_at is not None:
        return due_at(task.retry_at)
    return due_at(None if task.paused else task.scheduled_at)


def _advance(task: Task, now: datetime, **changes: object) -> Task:
    return msgspec.structs.replace(task, updated_at=now, revision=task.revision + 1, **changes)


def create(task: Task) -> Transition:
    """A new task: it waits for its ``scheduled_at`` when it has one."""
    return _step(None, task, schedule=due_at(task.scheduled_at))


def delete(task: Task, now: datetime) -> Transition:
    """The task goes, with its runs and its entry."""
    return Transition(before=task, after=None, schedule=UNSCHEDULE, at=now)


def touch(task: Task, now: datetime, **changes: object) -> Transition:
    """Any other change to the document (an update from the API). The queue stays while a
    run is active: its message waits in that queue."""
    queue = changes.get("queue", task.queue)
    if queue != task.queue and task.active_run is not None:
        raise InvalidTransition(
            f"task {task.id!r} is {task.status} on queue {task.queue!r}: cancel its run "
            "before moving it to another queue"
        )
    return _step(task, _advance(task, now, **changes))


def _pending_with_new_run(
    task: Task,
    attempt: int,
    now: datetime,
    entropy: Entropy,
    *,
    not_before: datetime | None = None,
    triggered_by: TriggeredBy | None = None,
    **changes: object,
) -> tuple[Task, Run]:
    run = Run(
        run_id=entropy.run_id(now),
        task_id=task.id,
        attempt=attempt,
        status=RunStatus.QUEUED,
        queued_at=now,
        not_before=not_before,
        triggered_by=triggered_by,
        queue=task.queue,
    )
    active = ActiveRun(run_id=run.run_id, attempt=run.attempt, not_before=not_before)
    pending = _advance(task, now, status=TaskStatus.PENDING, active_run=active, **changes)
    return pending, run


def _require_idle(task: Task) -> None:
    if task.active_run is not None:
        raise InvalidTransition(f"task {task.id!r} is already {task.status}")


def queue_run(
    task: Task,
    now: datetime,
    active: Run | None = None,
    *,
    entropy: Entropy = ENTROPY,
    triggered_by: TriggeredBy | None = None,
) -> Transition:
    """Run the task now: ``pending`` with a new queued run, due at once. Refused while a
    run is active, except a fire dispatched ahead of its due time, which is withdrawn
    first (it is not due yet: without the look-ahead there would be no run to refuse
    for). A one-shot time the task waits for is consumed: this is that run, brought
    forward. ``active`` is the task's active run, if any; the new run comes first in
    ``runs``. ``triggered_by``: the run of a chain that queues it."""
    idle, withdrawn = _withdraw_fire(task, active, now, "executed")
    _require_idle(idle)
    by = triggered_by
    if waits_for_one_shot(idle):
        pending, run = _pending_with_new_run(
            idle, 1, now, entropy, scheduled_at=None, next_runs=[], triggered_by=by
        )
    else:
        pending, run = _pending_with_new_run(idle, 1, now, entropy, triggered_by=by)
    return _step(task, pending, [run, *withdrawn], DueAt(timestamp(now)))


def fire_schedule(task: Task, now: datetime, *, entropy: Entropy = ENTROPY) -> Transition:
    """Queue the run a due ``scheduled_at`` asks for.

    A one-shot time is consumed; a recurrence moves on to its next fire time after
    ``now``, so fires missed while nothing ran (downtime) give one run, not one each.
    Fired ahead of its time (look-ahead dispatch: ``now`` is before ``scheduled_at``),
    the run waits for it (``not_before``) and the recurrence moves on to the fire after
    that time, never to that time again.
    A recurring task with ``misfire: skip`` whose fire is later than its grace time
    runs nothing: the run written is ``skipped`` and the task waits for its next fire.
    The queued run's entry stays the scheduler's claim until its dispatch is confirmed.
    """
    assert task.scheduled_at is not None
    _require_idle(task)
    due = task.scheduled_at
    ahead = due > now
    after = due if ahead else now
    upcoming = [] if task.schedule is None else next_fires(task.schedule, after, NEXT_RUNS_SHOWN)
    scheduled_at = upcoming[0] if upcoming else None
    late = (now - due).total_seconds()
    skips = task.misfire == MisfirePolicy.SKIP and late > task.misfire_grace
    if task.schedule is not None and skips:
        reason = (
            f"misfire: the fire due at {_iso(task.scheduled_at)} came {late:.0f} s late "
            f"(grace {task.misfire_grace:g} s); it and any later missed fires were skipped"
        )
        skipped = skipped_run(task, task.scheduled_at, reason, now, entropy)
        waiting = _advance(task, now, scheduled_at=scheduled_at, next_runs=upcoming)
        return _step(task, waiting, [skipped], due_at(scheduled_at))
    pending, run = _pending_with_new_run(
        task,
        1,
        now,
        entropy,
        not_before=due if ahead else None,
        scheduled_at=scheduled_at,
        next_runs=upcoming,
    )
    return _step(task, pending, [run])


def restore_entry(task: Task, now: datetime) -> Transition:
    """Put back the entry of an idle task claimed before its time, at that time."""
    assert task.scheduled_at is not None
    return _step(task, _advance(task, now), schedule=DueAt(timestamp(task.scheduled_at)))


def extend_lease(task: Task, now: datetime, until: datetime) -> Transition:
    """Move a running task's lease entry to ``until`` (its consumer could not renew it
    while the store was out of reach)."""
    return _step(task, _advance(task, now), schedule=DueAt(timestamp(until)))


def skipped_run(
    task: Task,
    due: datetime,
    reason: str,
    now: datetime,
    entropy: Entropy,
    *,
    triggered_by: TriggeredBy | None = None,
) -> Run:
    """A run that did not run: ``skipped`` at ``now`` for ``reason``, queued at ``due``."""
    return Run(
        run_id=entropy.run_id(now),
        task_id=task.id,
        attempt=1,
        status=RunStatus.SKIPPED,
        queued_at=due,
        finished_at=now,
        error=reason,
        triggered_by=triggered_by,
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _end_overlap(task: Task, ended: Run, now: datetime, entropy: Entropy) -> tuple[Task, list[Run]]:
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
    skipped = skipped_run(task, due, reason, now, entropy)
    waiting = msgspec.structs.replace(
        task, scheduled_at=upcoming[0] if upcoming else None, next_runs=upcoming
    )
    return waiting, [skipped]


def _ended(task: Task, after: Task, runs: Sequence[Run]) -> Transition:
    """A transition that ends a run: the run's entry gives way to what is due next."""
    return _step(task, after, runs, _entry_after_run(after))


def start_run(
    task: Task, run: Run, worker: str, now: datetime, *, lease_until: datetime
) -> Transition:
    """A worker takes a queued run; the task's entry becomes the run's lease, which the
    worker renews while the command runs. Refused before the run's ``not_before``
    (``NotDueYet``): whatever a clock or a message says, no run starts early."""
    if task.status != TaskStatus.PENDING or task.active_run is None:
        raise InvalidTransition(f"task {task.id!r} is {task.status}, not pending")
    if task.active_run.run_id != run.run_id or run.status != RunStatus.QUEUED:
        raise InvalidTransition(f"run {run.run_id!r} is not the queued run of {task.id!r}")
    if run.not_before is not None and run.not_before > now:
        raise NotDueYet(run, run.not_before)
    started = msgspec.structs.replace(run, status=RunStatus.RUNNING, started_at=now, worker=worker)
    running = _advance(task, now, status=TaskStatus.RUNNING, retry_at=None)
    return _step(task, running, [started], DueAt(timestamp(lease_until)))


def retry_delay(task: Task, attempt: int, entropy: Entropy = ENTROPY) -> float:
    """Seconds before the attempt after ``attempt``: exponential from ``retry_backoff``,
    which is a floor; jitter adds up to half of it again, so that tasks failing together
    do not retry together."""
    floor = task.retry_backoff * 2 ** (attempt - 1)
    return floor + floor / 2 * entropy.jitter()


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


def finish_run(
    task: Task, run: Run, outcome: Outcome, now: datetime, *, entropy: Entropy = ENTROPY
) -> Transition:
    """Record a run's outcome: ``completed`` when the exit code is one of the task's
    success codes; otherwise the next attempt is queued after a backoff while attempts
    are left (the task stays ``pending``, ``retry_at`` says when), else ``failed``.

    Writes the finished run, and a queued retry if any.
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
    return _ended(task, *_after_attempt(task, finished, succeeded, now, entropy))


def _after_attempt(
    task: Task, ended: Run, succeeded: bool, now: datetime, entropy: Entropy
) -> tuple[Task, list[Run]]:
    """The task once the attempt ``ended``: a failed one with attempts left queues the
    next attempt after a backoff (the task stays ``pending``, ``retry_at`` says when);
    otherwise the task is ``completed`` or ``failed``.

    Returns the task and the runs to write (the ended one, then a queued retry or a
    skipped fire).
    """
    summary = _summary_of(ended)
    if not succeeded and ended.attempt < task.max_attempts:
        retry_at = now + timedelta(seconds=retry_delay(task, ended.attempt, entropy))
        waiting, retry = _pending_with_new_run(
            task,
            ended.attempt + 1,
            now,
            entropy,
            not_before=retry_at,
            triggered_by=ended.triggered_by,
            last_run=summary,
            retry_at=retry_at,
            cancel_requested=False,
        )
        return waiting, [ended, retry]
    task_status = TaskStatus.COMPLETED if succeeded else TaskStatus.FAILED
    done = _advance(
        task, now, status=task_status, last_run=summary, active_run=None, cancel_requested=False
    )
    idle, skipped = _end_overlap(done, ended, now, entropy)
    return idle, [ended, *skipped]


DEAD_LETTER_LIMIT = 3
"""Times the dispatch of one queued run may be dead-lettered (and sent again) before the
run fails: consumers that keep stopping before they start it should not fail a task at
once, consumers that can never start it should not loop for ever."""
DEAD_LETTERED_REASON = (
    f"dead-lettered {DEAD_LETTER_LIMIT} times: its dispatch message kept going back to the "
    "queue without the run starting (consumers stopped or died before starting it)"
)


def _require_queued(task: Task, run: Run) -> None:
    if (
        task.status != TaskStatus.PENDING
        or task.active_run is None
        or task.active_run.run_id != run.run_id
        or run.status != RunStatus.QUEUED
    ):
        raise InvalidTransition(f"run {run.run_id!r} is not the queued run of {task.id!r}")


def dead_lettered(
    task: Task, run: Run, now: datetime, *, resend_at: datetime, entropy: Entropy = ENTROPY
) -> Transition:
    """The broker gave up on the dispatch message of a queued run. The run counts it and
    stays queued, to be dispatched again at ``resend_at``; at ``DEAD_LETTER_LIMIT`` it
    fails, and the task goes on as after any failed attempt (``active_run`` then is no
    longer ``run``)."""
    _require_queued(task, run)
    counted = msgspec.structs.replace(run, dead_letters=run.dead_letters + 1)
    if counted.dead_letters < DEAD_LETTER_LIMIT:
        return _step(task, _advance(task, now), [counted], DueAt(timestamp(resend_at)))
    failed = msgspec.structs.replace(
        counted, status=RunStatus.FAILED, finished_at=now, error=DEAD_LETTERED_REASON
    )
    return _ended(task, *_after_attempt(task, failed, False, now, entropy))


CANCELLED_REASON = "cancelled"


def cancel(
    task: Task, active: Run | None, now: datetime, *, entropy: Entropy = ENTROPY
) -> Transition:
    """Stop what is coming for the task: a running command (its consumer stops it and
    records the cancellation), a queued run (it never starts), or a one-shot time the
    task waits for (nothing runs at it). ``active`` is the task's active run, if any."""
    if task.status == TaskStatus.RUNNING:
        return request_cancel(task, now)
    if task.active_run is not None:
        assert active is not None, "the active run is read with the task"
        return cancel_queued(task, active, now, entropy=entropy)
    if waits_for_one_shot(task):
        cancelled = _advance(
            task, now, status=TaskStatus.CANCELLED, scheduled_at=None, next_runs=[]
        )
        return _step(task, cancelled, schedule=UNSCHEDULE)
    raise InvalidTransition(f"task {task.id!r} is {task.status}: nothing to cancel")


def cancel_unreadable(
    task: Task, unreadable: UnreadableRun, now: datetime, *, entropy: Entropy = ENTROPY
) -> Transition:
    """``cancel`` for a task whose active run's document cannot be read (``unreadable``).

    A running command is asked to stop as usual (that needs no run). A queued run, which
    no consumer can start (each skips a dispatch whose run it cannot read), is closed as
    cancelled from what the task knows of it: its document is replaced by one saying
    what was wrong with the old one. Short of deleting the task, this is the way to free
    it, so it is done only when a user asks to cancel."""
    if task.status == TaskStatus.RUNNING:
        return request_cancel(task, now)
    _require_active(task, unreadable, TaskStatus.PENDING)
    closed = _close_cancelled(task, _stand_in(task, unreadable, RunStatus.QUEUED), now, entropy)
    return _noting_unreadable(_ended(task, *closed), unreadable)


def _require_active(task: Task, unreadable: UnreadableRun, status: TaskStatus) -> None:
    active = task.active_run
    if task.status != status or active is None or active.run_id != unreadable.run_id:
        raise InvalidTransition(
            f"run {unreadable.run_id!r} is not the active run of {task.id!r}: read it again"
        )


def _stand_in(task: Task, unreadable: UnreadableRun, status: RunStatus) -> Run:
    """The active run of ``task`` whose document cannot be read (``unreadable``), as far
    as the task knows it: what closing it needs, and nothing the task does not say."""
    active = task.active_run
    assert active is not None and active.run_id == unreadable.run_id
    return Run(
        run_id=active.run_id,
        task_id=task.id,
        attempt=active.attempt,
        status=status,
        # The task's last change: when a queued run was queued; for a running one, when it
        # started or later (which is all the task says of it).
        queued_at=task.updated_at,
        not_before=active.not_before,
        queue=task.queue,
    )


def _noting_unreadable(closing: Transition, unreadable: UnreadableRun) -> Transition:
    """``closing``, whose first run replaces the document that could not be read, with
    that run's ``error`` saying what was wrong with the old document."""
    closed, *others = closing.runs
    error = f"{closed.error}; its stored document could not be read: {unreadable.reason}"
    return replace(closing, runs=(msgspec.structs.replace(closed, error=error), *others))


def cancel_queued(task: Task, run: Run, now: datetime, *, entropy: Entropy = ENTROPY) -> Transition:
    """Cancel a pending task's queued run: it never starts."""
    _require_queued(task, run)
    return _ended(task, *_close_cancelled(task, run, now, entropy))


def request_cancel(task: Task, now: datetime) -> Transition:
    """Ask the consumer running the task to stop it (it records the cancellation)."""
    if task.status != TaskStatus.RUNNING:
        raise InvalidTransition(f"task {task.id!r} is {task.status}, not running")
    return _step(task, _advance(task, now, cancel_requested=True))


def cancel_running(
    task: Task, run: Run, outcome: Outcome, now: datetime, *, entropy: Entropy = ENTROPY
) -> Transition:
    """Record a running run stopped on request, with what it printed until then."""
    _require_running(task, run)
    stopped = msgspec.structs.replace(
        run,
        exit_code=outcome.exit_code,
        duration=outcome.duration,
        output=outcome.output,
        truncated=outcome.truncated,
    )
    return _ended(task, *_close_cancelled(task, stopped, now, entropy))


def _close_cancelled(
    task: Task, run: Run, now: datetime, entropy: Entropy
) -> tuple[Task, list[Run]]:
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
    idle, skipped = _end_overlap(cancelled, closed, now, entropy)
    return idle, [closed, *skipped]


def requeue_run(
    task: Task, run: Run, reason: str, now: datetime, *, entropy: Entropy = ENTROPY
) -> Transition:
    """Give back a run this worker could not finish (shutdown): close it and queue a
    fresh one, due at once. Writes the closed run, then the new queued one."""
    if task.active_run is None or task.active_run.run_id != run.run_id:
        raise InvalidTransition(f"run {run.run_id!r} is not the active run of {task.id!r}")
    closed = msgspec.structs.replace(run, status=RunStatus.CANCELLED, finished_at=now, error=reason)
    pending, fresh = _pending_with_new_run(
        task, run.attempt, now, entropy, triggered_by=run.triggered_by
    )
    return _step(task, pending, [closed, fresh], DueAt(timestamp(now)))


LOST_REASON_PREFIX = "lost:"
"""How the error of a lost run begins (``run_outcome`` tells lost runs by it)."""
LOST_RUN_LIMIT = 3
"""Attempts a task gets when its runs keep being lost (their worker dies mid-run)."""


def lose_run(task: Task, run: Run, now: datetime, *, entropy: Entropy = ENTROPY) -> Transition:
    """A run whose worker stopped renewing its lease: close it as failed, then queue the
    next attempt, or fail the task once ``LOST_RUN_LIMIT`` attempts were made.

    Writes the lost run, and the new queued one if any. A new queued run keeps the entry
    (the scheduler's claim) until its dispatch is confirmed.
    """
    _require_running(task, run)
    if task.cancel_requested:
        return _ended(task, *_close_cancelled(task, run, now, entropy))
    worker = "its worker" if run.worker is None else f"worker {run.worker}"
    reason = f"{LOST_REASON_PREFIX} {worker} stopped renewing its lease"
    lost = msgspec.structs.replace(run, status=RunStatus.FAILED, finished_at=now, error=reason)
    if run.attempt < LOST_RUN_LIMIT:
        pending, fresh = _pending_with_new_run(
            task, run.attempt + 1, now, entropy, triggered_by=run.triggered_by
        )
        return _step(task, pending, [lost, fresh])
    summary = _summary_of(lost)
    failed = _advance(task, now, status=TaskStatus.FAILED, last_run=summary, active_run=None)
    idle, skipped = _end_overlap(failed, lost, now, entropy)
    return _ended(task, idle, [lost, *skipped])


def lose_unreadable_run(
    task: Task, unreadable: UnreadableRun, now: datetime, *, entropy: Entropy = ENTROPY
) -> Transition:
    """``lose_run`` for a running task whose run's document cannot be read
    (``unreadable``; a hand edit in Redis while it ran, say) and whose worker stopped
    renewing its lease. The run is closed from what the task knows of it, its document
    replaced by one saying what was wrong with the old one; the task goes on as after
    any lost run (its next attempt queued, or failed at ``LOST_RUN_LIMIT``)."""
    _require_active(task, unreadable, TaskStatus.RUNNING)
    lost = lose_run(task, _stand_in(task, unreadable, RunStatus.RUNNING), now, entropy=entropy)
    return _noting_unreadable(lost, unreadable)


def fired_ahead(task: Task, now: datetime) -> bool:
    """Whether the task's queued run is a scheduled fire dispatched ahead of its due time
    (look-ahead dispatch) that is not due yet. A retry waiting for its time is not one."""
    active = task.active_run
    return (
        task.status == TaskStatus.PENDING
        and active is not None
        and active.not_before is not None
        and active.not_before > now
        and task.retry_at is None
    )


def _withdraw_fire(
    task: Task, active: Run | None, now: datetime, why: str
) -> tuple[Task, list[Run]]:
    """Take back a fire dispatched ahead of its due time, as if it had not been fired:
    its run is recorded ``skipped`` (its message, when it comes, finds nothing to start)
    and the task waits for that due time again, so that the change the caller makes next
    (pause, a new schedule) decides whether and when it runs. Any other task is returned
    as it is. ``active`` is the task's active run, if any."""
    if not fired_ahead(task, now):
        return task, []
    assert task.active_run is not None and task.active_run.not_before is not None
    assert active is not None and active.run_id == task.active_run.run_id
    due = task.active_run.not_before
    withdrawn = msgspec.structs.replace(
        active,
        status=RunStatus.SKIPPED,
        finished_at=now,
        error=f"withdrawn before its due time {_iso(due)}: the task was {why}",
    )
    upcoming = [due, *(fire for fire in task.next_runs if fire > due)][:NEXT_RUNS_SHOWN]
    # ``pending`` settles into what an idle task shows (see ``_settled``).
    idle = msgspec.structs.replace(
        task, status=TaskStatus.PENDING, active_run=None, scheduled_at=due, next_runs=upcoming
    )
    return idle, [withdrawn]


def reschedule(task: Task, at: datetime, now: datetime, active: Run | None = None) -> Transition:
    """Run once at ``at`` (replacing any recurrence): the task is ``pending`` until then.
    A fire dispatched ahead of its time is withdrawn: the task runs at ``at`` only."""
    idle, withdrawn = _withdraw_fire(task, active, now, "rescheduled")
    scheduled = _advance(idle, now, scheduled_at=at, schedule=None, next_runs=[at], paused=False)
    return _step(task, scheduled, withdrawn, schedule=_entry_unless_busy(idle, scheduled))


def recur(
    task: Task, recurrence: Recurrence, now: datetime, active: Run | None = None
) -> Transition:
    """Run on ``recurrence`` from now on; raises ``InvalidSchedule`` if it never fires.
    A fire dispatched ahead of its time is withdrawn: the new recurrence alone decides."""
    upcoming = next_fires(recurrence, now, NEXT_RUNS_SHOWN)
    if not upcoming:
        raise InvalidSchedule("the schedule never fires after now (is `end` in the past?)")
    idle, withdrawn = _withdraw_fire(task, active, now, "rescheduled")
    recurring = _advance(
        idle, now, scheduled_at=upcoming[0], schedule=recurrence, next_runs=upcoming, paused=False
    )
    return _step(task, recurring, withdrawn, schedule=_entry_unless_busy(idle, recurring))


def pause(task: Task, now: datetime, active: Run | None = None) -> Transition:
    """Stop scheduled fires until ``resume``; running it by hand still works. A fire
    dispatched ahead of its time is withdrawn: it does not run at its due time."""
    idle, withdrawn = _withdraw_fire(task, active, now, "paused")
    if idle.scheduled_at is None:
        raise InvalidTransition(f"task {task.id!r} has no schedule to pause")
    paused = _advance(idle, now, paused=True)
    return _step(task, paused, withdrawn, schedule=_entry_unless_busy(idle, paused))


def resume(task: Task, now: datetime) -> Transition:
    """Fire on schedule again: a recurrence goes on from now (fires missed while paused
    are skipped); a one-shot time that passed meanwhile fires at once."""
    if not task.paused:
        raise InvalidTransition(f"task {task.id!r} is not paused")
    if task.schedule is not None:
        upcoming = next_fires(task.schedule, now, NEXT_RUNS_SHOWN)
        if not upcoming:
            raise InvalidSchedule("the schedule never fires after now (is `end` in the past?)")
        resumed = _advance(task, now, scheduled_at=upcoming[0], next_runs=upcoming, paused=False)
    else:
        resumed = _advance(task, now, paused=False)
    return _step(task, resumed, schedule=_entry_unless_busy(task, resumed))


def unschedule(task: Task, now: datetime, active: Run | None = None) -> Transition:
    """No more scheduled runs (a run already queued or running is not affected, but a
    fire dispatched ahead of its due time is withdrawn: it is not due yet)."""
    waiting, withdrawn = _withdraw_fire(task, active, now, "unscheduled")
    idle = _advance(waiting, now, scheduled_at=None, schedule=None, next_runs=[], paused=False)
    return _step(task, idle, withdrawn, schedule=_entry_unless_busy(waiting, idle))


def set_aside(task: Task, problem: str, now: datetime, *, entropy: Entropy = ENTROPY) -> Transition:
    """Unschedule a task whose schedule cannot be planned (a recurrence the calendar
    cannot compute, say), writing a skipped run whose ``error`` says why, so a user sees
    it. A run already active goes on under its own entry."""
    due = task.scheduled_at or now
    reason = f"unscheduled: its next fire could not be planned ({problem})"
    skipped = skipped_run(task, due, reason, now, entropy)
    idle = _advance(task, now, scheduled_at=None, schedule=None, next_runs=[], paused=False)
    return _step(task, idle, [skipped], _entry_unless_busy(task, idle))

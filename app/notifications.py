"""Notifications (webhooks): which ones a transition causes, what they say, and how their
delivery goes. Pure: no I/O, time comes in as arguments.

When each event of a task's ``notify`` is sent:

- ``on_start``: a run starts (every attempt is a run of its own).
- ``on_success`` and ``success_ping``: a run completes (``RunOutcome.COMPLETED``).
- ``on_failure``: the task's run fails for good: its outcome is ``failed``, ``timed_out``,
  ``lost`` or ``not_started`` and no retry follows (an attempt that is retried notifies
  nothing: failure means the job failed, as in Cronicle).
- ``on_not_started``: a run that never ran: a final ``not_started`` run (its command could
  not be started, or its dispatch kept being dead-lettered), or a fire recorded
  ``skipped`` (missed by more than its grace time, due while the previous run still ran
  under ``overlap: forbid``, or a schedule that could not be planned). A fire withdrawn
  because a person paused, rescheduled or executed the task is not one.
- ``on_still_running``: once, when a run is still running ``after`` seconds after it
  started (written when the run starts, due then, dropped if the run has ended).
- A cancelled run notifies nothing: a person asked for it.

Each notification is written to the store's outbox in the commit of the transition that
causes it (``TaskChange.notifications``), so that none is lost between that commit and
its delivery; the notifier (``app.notifier``) delivers it at least once.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from urllib.parse import quote

import msgspec

from app.domain import Notify, Run, RunOutcome, RunStatus, Task, Transition, run_outcome, timestamp


class NotifyEvent(StrEnum):
    """The events of ``Notify``, named as its fields."""

    ON_START = "on_start"
    ON_SUCCESS = "on_success"
    ON_FAILURE = "on_failure"
    ON_NOT_STARTED = "on_not_started"
    ON_STILL_RUNNING = "on_still_running"
    SUCCESS_PING = "success_ping"


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class RunFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a notification says about its run (as the body's ``run`` shows it)."""

    id: str
    attempt: int
    outcome: RunOutcome | None
    exit_code: int | None
    duration: float | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    """One notification to deliver: what happened to which run, to which URL, from when
    (``due``, unix seconds). ``id`` is the delivery id: the same for every attempt, so a
    receiver can drop a duplicate."""

    id: str
    event: NotifyEvent
    url: str
    due: float
    task_id: str
    task_name: str
    run: RunFacts

    @property
    def run_id(self) -> str:
        return self.run.id


class NotificationRecord(msgspec.Struct, kw_only=True):
    """How a notification's delivery went, as the run shows it."""

    event: NotifyEvent
    url: str
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    last_error: str | None = None
    delivered_at: datetime | None = None


class OutboxEntry(msgspec.Struct, kw_only=True):
    """A notification in the outbox, with its delivery so far."""

    notification: Notification
    record: NotificationRecord


def new_entry(notification: Notification) -> OutboxEntry:
    """The outbox entry of a notification nobody tried to deliver yet."""
    record = NotificationRecord(event=notification.event, url=notification.url)
    return OutboxEntry(notification=notification, record=record)


FAILURE_OUTCOMES = frozenset(
    {RunOutcome.FAILED, RunOutcome.TIMED_OUT, RunOutcome.LOST, RunOutcome.NOT_STARTED}
)


def notifications_for(transition: Transition) -> tuple[Notification, ...]:
    """The notifications ``transition`` causes (see the module docstring); none for a
    task without ``notify``, at no cost."""
    task = transition.after
    if task is None or task.notify is None:
        return ()
    before = transition.before
    # A skipped run that was the active one is a fire a person withdrew (pause, a new
    # schedule, execute); one its policy skips is a run of its own.
    was_active = None if before is None or before.active_run is None else before.active_run.run_id
    # A run ends with the task still active only when its next attempt is queued.
    retry_follows = task.active_run is not None
    return tuple(
        _notification(task, run, event, url, due)
        for run in transition.runs
        for event, url, due in _events(
            task.notify, run, retry_follows=retry_follows, withdrawn=run.run_id == was_active
        )
        if url is not None and due is not None
    )


def _events(
    notify: Notify, run: Run, *, retry_follows: bool, withdrawn: bool
) -> Iterator[tuple[NotifyEvent, str | None, datetime | None]]:
    """The events ``run``, as written, is at: each with its URL (``None``: not wanted)
    and when it is due."""
    if run.status == RunStatus.RUNNING:
        yield NotifyEvent.ON_START, notify.on_start, run.started_at
        if (still := notify.on_still_running) is not None and run.started_at is not None:
            yield (
                NotifyEvent.ON_STILL_RUNNING,
                still.url,
                run.started_at + timedelta(seconds=still.after),
            )
        return
    outcome = run_outcome(run)
    ended = run.finished_at
    if outcome == RunOutcome.COMPLETED:
        yield NotifyEvent.ON_SUCCESS, notify.on_success, ended
        yield NotifyEvent.SUCCESS_PING, notify.success_ping, ended
    elif outcome in FAILURE_OUTCOMES and not retry_follows:
        yield NotifyEvent.ON_FAILURE, notify.on_failure, ended
    if (outcome == RunOutcome.NOT_STARTED and not retry_follows) or (
        outcome == RunOutcome.SKIPPED and not withdrawn
    ):
        yield NotifyEvent.ON_NOT_STARTED, notify.on_not_started, ended


def _notification(
    task: Task, run: Run, event: NotifyEvent, url: str, due: datetime
) -> Notification:
    return Notification(
        id=f"{task.id}/{run.run_id}/{event}",
        event=event,
        url=url,
        due=timestamp(due),
        task_id=task.id,
        task_name=task.name,
        run=RunFacts(
            id=run.run_id,
            attempt=run.attempt,
            outcome=run_outcome(run),
            exit_code=run.exit_code,
            duration=run.duration,
            started_at=run.started_at,
            finished_at=run.finished_at,
            error=run.error,
        ),
    )


class _TaskNamed(msgspec.Struct):
    id: str
    name: str


class _RunLinked(RunFacts, frozen=True, kw_only=True):
    url: str


class _Body(msgspec.Struct):
    event: NotifyEvent
    delivery_id: str
    sent_at: datetime
    task: _TaskNamed
    run: _RunLinked


def run_link(public_url: str, task_id: str, run_id: str) -> str:
    """Where the API shows the run."""
    return f"{public_url.rstrip('/')}/tasks/{quote(task_id)}/runs/{quote(run_id)}"


def body_of(notification: Notification, *, public_url: str, sent_at: datetime) -> bytes:
    """The JSON body of a webhook (a success ping has none). ``sent_at`` is part of what
    is signed, so a receiver can refuse an old body sent again (a replay)."""
    n = notification
    link = run_link(public_url, n.task_id, n.run_id)
    run = _RunLinked(**msgspec.structs.asdict(n.run), url=link)
    body = _Body(
        event=n.event,
        delivery_id=n.id,
        sent_at=sent_at.astimezone(UTC),
        task=_TaskNamed(id=n.task_id, name=n.task_name),
        run=run,
    )
    return msgspec.json.encode(body)


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Taskq-Signature`` of ``body``: ``sha256=`` and the hex HMAC-SHA256 of its
    exact bytes under the secret."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


MAX_RETRY_DELAY = 3600.0


def retry_delay(first: float, attempts: int, jitter: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones: ``first`` doubling
    each time (at most ``MAX_RETRY_DELAY``), plus up to half again (``jitter`` in [0, 1])
    so that receivers coming back are not hit by every retry at once."""
    floor = min(first * 2 ** (attempts - 1), MAX_RETRY_DELAY)
    return floor + floor / 2 * jitter


def retryable_status(status_code: int) -> bool:
    """Whether an answer with this status is worth trying again: 429 and 5xx. Other 4xx
    say the request itself is refused (a wrong URL, no access): sending it again gets
    the same answer."""
    return status_code == 429 or status_code >= 500


def delivered(entry: OutboxEntry, now: datetime) -> OutboxEntry:
    """``entry`` once the receiver accepted it."""
    record = msgspec.structs.replace(
        entry.record,
        state=DeliveryState.DELIVERED,
        attempts=entry.record.attempts + 1,
        delivered_at=now,
    )
    return msgspec.structs.replace(entry, record=record)


def not_delivered(
    entry: OutboxEntry,
    error: str,
    now: datetime,
    *,
    retryable: bool,
    max_attempts: int,
    first_delay: float,
    jitter: float,
) -> tuple[OutboxEntry, float | None]:
    """``entry`` after a try that failed with ``error``, and when to try again (unix
    seconds), or ``None`` when it is given up: not ``retryable``, or ``max_attempts``
    made."""
    attempts = entry.record.attempts + 1
    again = retryable and attempts < max_attempts
    record = msgspec.structs.replace(
        entry.record,
        state=DeliveryState.PENDING if again else DeliveryState.FAILED,
        attempts=attempts,
        last_error=error[:500],
    )
    retry_at = timestamp(now) + retry_delay(first_delay, attempts, jitter) if again else None
    return msgspec.structs.replace(entry, record=record), retry_at

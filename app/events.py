"""Lifecycle events: what a user watching taskq sees happen to tasks and runs.

Pure, like ``app.domain``: ``lifecycle_events`` reads them off a ``Transition``, so every
writer (API, scheduler, consumer, bulk create) produces them by committing its change,
and the store writes them in the same atomic step (``TaskChange.events``). Only steps a
user would notice make events: a task created, changed or deleted, a run queued,
started or finished. The workers' bookkeeping (a lease renewed, a claim restored, a
dispatch counted as dead-lettered, a cancel requested of a running command) makes none.

An event's id is its place in the store's event log (a Redis stream id such as
``1732838400000-0``: increasing), given when it is written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from operator import attrgetter

import msgspec

from app.domain import (
    FINISHED_RUN_STATUSES,
    DomainError,
    Run,
    RunOutcome,
    RunStatus,
    Task,
    TaskStatus,
    Transition,
    run_outcome,
)


class EventType(StrEnum):
    TASK_CREATED = "task.created"
    TASK_UPDATED = "task.updated"
    TASK_DELETED = "task.deleted"
    RUN_QUEUED = "run.queued"
    RUN_STARTED = "run.started"
    RUN_FINISHED = "run.finished"


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One lifecycle event, as ``GET /events`` sends it; fields that do not apply are
    left out. ``at`` is when the change happened (its transition's ``now``)."""

    id: str = ""
    """Its id in the event log; empty until it is written there."""
    type: EventType
    at: datetime
    task_id: str
    task_status: TaskStatus | None = None
    run_id: str | None = None
    attempt: int | None = None
    run_status: RunStatus | None = None
    outcome: RunOutcome | None = None
    exit_code: int | None = None
    duration: float | None = None

    def logged_as(self, event_id: str) -> Event:
        """This event with its id in the event log."""
        return msgspec.structs.replace(self, id=event_id)


_settings = attrgetter(
    "name",
    "description",
    "command",
    "args",
    "env",
    "cwd",
    "timeout",
    "max_attempts",
    "retry_backoff",
    "success_exit_codes",
    "misfire",
    "misfire_grace",
    "overlap",
    "schedule",
    "paused",
    "notify",
)
"""The fields a user sets (update, schedule, pause): a change that also moves runs
along is a ``task.updated`` only when one of these changed."""
_BOOKKEEPING = frozenset({"updated_at", "revision", "cancel_requested"})
"""Fields that change on every step, or only for the workers: never a ``task.updated``."""
_shown = attrgetter(*(name for name in Task.__struct_fields__ if name not in _BOOKKEEPING))
"""The fields a user sees change."""


def lifecycle_events(transition: Transition) -> tuple[Event, ...]:
    """The events ``transition`` makes, in the order they happened: the task's own
    (created, updated, deleted), then its runs', runs that ended before runs that began
    (a failed attempt ends before its retry is queued)."""
    before, after, at = transition.before, transition.after, transition.at
    if after is None:
        assert before is not None
        return (task_deleted(before.id, at),)
    if before is None:  # (a new task has no runs yet)
        return (_task_event(EventType.TASK_CREATED, after, at),)
    runs = transition.runs
    if len(runs) > 1:
        runs = sorted(runs, key=lambda run: run.status not in FINISHED_RUN_STATUSES)
    run_events = [
        event for run in runs if (event := _run_event(before, after, run, at)) is not None
    ]
    # With runs moving, only a setting changing is news of its own; without, any
    # change a user can see is.
    seen = _settings if run_events else _shown
    if seen(before) == seen(after):
        return tuple(run_events)
    return (_task_event(EventType.TASK_UPDATED, after, at), *run_events)


def task_deleted(task_id: str, at: datetime) -> Event:
    """The event of a task deleted (also one whose document could not be read)."""
    return Event(type=EventType.TASK_DELETED, at=at, task_id=task_id)


def _task_event(kind: EventType, task: Task, at: datetime) -> Event:
    return Event(type=kind, at=at, task_id=task.id, task_status=task.status)


def _run_event(before: Task | None, after: Task, run: Run, at: datetime) -> Event | None:
    """The event of a run written by a transition: a run queued (a new one: a queued run
    written again only counted a dead letter), started, or finished."""
    match run.status:
        case RunStatus.QUEUED:
            active = None if before is None else before.active_run
            if active is not None and active.run_id == run.run_id:
                return None
            kind = EventType.RUN_QUEUED
        case RunStatus.RUNNING:
            kind = EventType.RUN_STARTED
        case _:
            kind = EventType.RUN_FINISHED
    finished = kind == EventType.RUN_FINISHED
    return Event(
        type=kind,
        at=at,
        task_id=after.id,
        task_status=after.status,
        run_id=run.run_id,
        attempt=run.attempt,
        run_status=run.status,
        outcome=run_outcome(run) if finished else None,
        exit_code=run.exit_code if finished else None,
        duration=run.duration if finished else None,
    )


class InvalidEventId(DomainError):
    def __init__(self, text: str) -> None:
        super().__init__(
            f"{text!r} is not an event id (two whole numbers joined by '-', as in 1732838400000-0)"
        )


EVENT_ID_PATTERN = r"^\d{1,20}-\d{1,20}$(?!\n)"  # (?!\n): a full match
_EVENT_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_MAX_PART = 2**64 - 1


def event_key(event_id: str) -> tuple[int, int]:
    """An event id as numbers that sort as the ids do; ``InvalidEventId`` if it is none."""
    match = _EVENT_ID.fullmatch(event_id)
    if match is None:
        raise InvalidEventId(event_id)
    key = int(match[1]), int(match[2])
    if max(key) > _MAX_PART:
        raise InvalidEventId(event_id)
    return key


def keep_task(events: Sequence[Event], task_id: str | None) -> list[Event]:
    """The events of one task (all of them with ``None``)."""
    return list(events) if task_id is None else [e for e in events if e.task_id == task_id]

"""Recurring schedules: fire times, time zones and DST, bounds, coalescing (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from app.domain import (
    Recurrence,
    Task,
    TaskStatus,
    fire_schedule,
    next_fires,
    recur,
    unschedule,
)
from app.schemas import ScheduleRequest


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def iso(moments: list[datetime]) -> list[str]:
    return [m.strftime("%Y-%m-%dT%H:%M:%SZ") for m in moments]


def test_cron_runs_in_its_time_zone() -> None:
    berlin = Recurrence(cron="0 9 * * *", timezone="Europe/Berlin")
    # 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
    assert iso(next_fires(berlin, utc("2026-01-10T12:00:00Z"), 2)) == [
        "2026-01-11T08:00:00Z",
        "2026-01-12T08:00:00Z",
    ]
    assert iso(next_fires(berlin, utc("2026-07-10T12:00:00Z"), 1)) == ["2026-07-11T07:00:00Z"]


def test_a_local_time_that_does_not_exist_fires_at_the_next_valid_time() -> None:
    # 2026-03-29: Berlin clocks jump from 02:00 to 03:00; 02:30 does not exist.
    daily = Recurrence(cron="30 2 * * *", timezone="Europe/Berlin")
    assert iso(next_fires(daily, utc("2026-03-28T12:00:00Z"), 3)) == [
        "2026-03-29T01:00:00Z",  # 03:00 CEST, shifted forward
        "2026-03-30T00:30:00Z",  # 02:30 CEST
        "2026-03-31T00:30:00Z",
    ]


def test_a_repeated_local_time_fires_once() -> None:
    # 2026-10-25: Berlin clocks go back from 03:00 to 02:00; 02:30 happens twice.
    daily = Recurrence(cron="30 2 * * *", timezone="Europe/Berlin")
    assert iso(next_fires(daily, utc("2026-10-24T12:00:00Z"), 2)) == [
        "2026-10-25T00:30:00Z",  # 02:30 CEST, the first of the two
        "2026-10-26T01:30:00Z",  # 02:30 CET the next day
    ]


def test_a_leading_sixth_field_counts_seconds() -> None:
    every_ten = Recurrence(cron="*/10 * * * * *")
    assert iso(next_fires(every_ten, utc("2026-01-01T00:00:03Z"), 3)) == [
        "2026-01-01T00:00:10Z",
        "2026-01-01T00:00:20Z",
        "2026-01-01T00:00:30Z",
    ]


def test_every_keeps_its_phase_from_start() -> None:
    start = utc("2026-01-01T00:00:00Z")
    interval = Recurrence(every=90, start=start)
    assert iso(next_fires(interval, start + timedelta(seconds=100), 2)) == [
        "2026-01-01T00:03:00Z",
        "2026-01-01T00:04:30Z",
    ]
    # Before the start, the start itself is the first fire.
    assert next_fires(interval, start - timedelta(hours=1), 1) == [start]


def test_nothing_fires_outside_start_and_end() -> None:
    bounded = Recurrence(
        cron="0 * * * *", start=utc("2026-01-01T10:00:00Z"), end=utc("2026-01-01T12:00:00Z")
    )
    assert iso(next_fires(bounded, utc("2026-01-01T00:00:00Z"), 10)) == [
        "2026-01-01T10:00:00Z",
        "2026-01-01T11:00:00Z",
        "2026-01-01T12:00:00Z",
    ]
    assert next_fires(bounded, utc("2026-01-01T12:00:00Z"), 10) == []


def make_task(**changes: object) -> Task:
    now = utc("2026-01-01T00:00:00Z")
    task = Task(id="t", name="t", command="true", created_at=now, updated_at=now)
    return msgspec.structs.replace(task, **changes)


def test_recur_shows_the_next_five_runs_and_unschedule_clears_them() -> None:
    now = utc("2026-01-01T00:00:30Z")
    task = recur(make_task(), Recurrence(cron="* * * * *"), now).task
    assert iso(task.next_runs) == [f"2026-01-01T00:0{n}:00Z" for n in range(1, 6)]
    assert task.scheduled_at == task.next_runs[0]
    cleared = unschedule(task, now).task
    assert (cleared.scheduled_at, cleared.schedule, cleared.next_runs) == (None, None, [])


def test_missed_fires_coalesce_into_one_run() -> None:
    hourly = Recurrence(cron="0 * * * *")
    overdue = make_task(schedule=hourly, scheduled_at=utc("2026-01-01T01:00:00Z"))
    # The scheduler was down for hours: the task fires once, then waits for the next hour.
    now = utc("2026-01-01T05:20:00Z")
    fired = fire_schedule(overdue, now)
    pending, run = fired.task, fired.run
    assert pending.status == TaskStatus.PENDING and run.attempt == 1
    assert pending.scheduled_at == utc("2026-01-01T06:00:00Z")
    assert pending.schedule == hourly


def test_a_one_shot_time_is_consumed_when_it_fires() -> None:
    once = make_task(scheduled_at=utc("2026-01-01T01:00:00Z"))
    pending = fire_schedule(once, utc("2026-01-01T01:00:00Z")).task
    assert (pending.scheduled_at, pending.next_runs) == (None, [])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one of"),
        ({"at": "2030-01-01T00:00:00Z", "every": 60}, "exactly one of"),
        ({"cron": "61 * * * *"}, "`cron`"),
        ({"cron": "0 0 32 * *"}, "`cron`"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "`timezone`"),
        ({"every": 60, "timezone": "UTC"}, "`timezone` goes with `cron`"),
        ({"every": 0.5}, ">= 1"),
        ({"at": "2030-01-01T00:00:00Z", "end": "2031-01-01T00:00:00Z"}, "`start` and `end`"),
        (
            {"every": 60, "start": "2030-01-02T00:00:00Z", "end": "2030-01-01T00:00:00Z"},
            "before `end`",
        ),
    ],
)
def test_bad_schedules_are_refused_with_a_message_naming_the_field(
    body: dict[str, object], message: str
) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.json.decode(msgspec.json.encode(body), type=ScheduleRequest)

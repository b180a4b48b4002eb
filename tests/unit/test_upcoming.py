"""Upcoming fires: recurrences expanded from the task documents, merged in time order
and paged, over the memory store (the reference ``scheduled_entries``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.adapters.memory_store import MemoryStore
from app.domain import Outcome, Task, finish_run, queue_run, start_run, timestamp
from app.ports import TaskChange
from app.schemas import ScheduleRequest, TaskCreate
from app.service import TaskService
from app.upcoming import MAX_TASKS_PER_PAGE, InvalidWindow, TooManyScheduled, UpcomingFire

NOW = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(store: MemoryStore, clock: Clock) -> TaskService:
    return TaskService(store, clock=clock)


async def add(service: TaskService, task_id: str, **schedule: object) -> Task:
    """A task, on ``schedule`` (``ScheduleRequest`` fields) when given."""
    task = await service.create(TaskCreate(id=task_id, name=f"name of {task_id}", command="true"))
    if schedule:
        task = await service.schedule(task_id, ScheduleRequest(**schedule))  # type: ignore[arg-type]
    return task


async def every_fire(
    service: TaskService, start: str | None = None, end: str | None = None, *, limit: int = 1000
) -> list[UpcomingFire]:
    """All the fires of the window, following cursors, checking each page's length."""
    fires, cursor = await service.upcoming(start=start, end=end, limit=limit, cursor=None)
    while cursor is not None:
        assert len(fires) % limit == 0, "only the last page is short here"
        page, cursor = await service.upcoming(start=None, end=None, limit=limit, cursor=cursor)
        fires += page
    return fires


def listed(fires: list[UpcomingFire]) -> list[tuple[str, str]]:
    return [(iso(fire.due_at), fire.task_id) for fire in fires]


async def test_cron_in_a_time_zone_fires_at_local_times_across_dst(service: TaskService) -> None:
    # Berlin springs forward on 2026-03-29: 02:30 does not exist that night.
    await add(service, "nightly", cron="30 2 * * *", timezone="Europe/Berlin")
    fires = await every_fire(service, "2026-03-27T12:00:00Z", "2026-03-31T00:00:00Z")
    assert listed(fires) == [
        ("2026-03-28T01:30:00Z", "nightly"),  # 02:30 CET
        ("2026-03-29T01:00:00Z", "nightly"),  # no 02:30: the next valid time, 03:00 CEST
        ("2026-03-30T00:30:00Z", "nightly"),  # 02:30 CEST
    ]
    assert all(fire.recurring and not fire.retry for fire in fires)
    assert fires[0].name == "name of nightly"


async def test_every_stays_within_start_and_end(service: TaskService) -> None:
    await add(
        service,
        "bounded",
        every=3600,
        start=utc("2026-03-28T00:00:00Z"),
        end=utc("2026-03-28T03:00:00Z"),
    )
    fires = await every_fire(service, "2026-03-27T12:00:00Z", "2026-03-29T12:00:00Z")
    assert [when for when, _ in listed(fires)] == [
        "2026-03-28T00:00:00Z",
        "2026-03-28T01:00:00Z",
        "2026-03-28T02:00:00Z",
        "2026-03-28T03:00:00Z",
    ]


async def test_window_is_from_inclusive_to_exclusive(service: TaskService) -> None:
    await add(service, "hourly", every=3600, start=utc("2026-03-27T12:00:00Z"))
    fires = await every_fire(service, "2026-03-27T13:00:00Z", "2026-03-27T15:00:00Z")
    assert [when for when, _ in listed(fires)] == ["2026-03-27T13:00:00Z", "2026-03-27T14:00:00Z"]


async def test_one_shot_is_listed_once_and_paused_or_unscheduled_not_at_all(
    service: TaskService,
) -> None:
    await add(service, "once", at=utc("2026-03-27T18:00:00Z"))
    await add(service, "paused", every=600)
    await service.pause("paused")
    await add(service, "idle")
    fires = await every_fire(service)
    assert listed(fires) == [("2026-03-27T18:00:00Z", "once")]
    assert not fires[0].recurring


async def test_a_retry_waiting_for_its_time_is_listed_as_a_retry(
    service: TaskService, store: MemoryStore, clock: Clock
) -> None:
    await service.create(
        TaskCreate(id="flaky", name="flaky", command="false", max_attempts=2, retry_backoff=600)
    )
    task = await store.get_task("flaky")
    assert task is not None
    queued = queue_run(task, NOW)
    await store.commit(TaskChange.of(queued))
    started = start_run(queued.task, queued.run, "w", NOW, lease_until=NOW + timedelta(seconds=30))
    await store.commit(TaskChange.of(started))
    failed = Outcome(exit_code=1, duration=0.1, output="", truncated=False)
    retried = finish_run(started.task, started.run, failed, NOW)
    await store.commit(TaskChange.of(retried))
    retry_at = retried.task.retry_at
    assert retry_at is not None and retry_at >= NOW + timedelta(seconds=600)

    [fire] = await every_fire(service)
    assert (fire.task_id, fire.due_at, fire.retry, fire.recurring) == (
        "flaky",
        retry_at,
        True,
        False,
    )


async def test_a_running_recurring_task_lists_its_next_fires(
    service: TaskService, store: MemoryStore
) -> None:
    # Its entry in scheduled_tasks is its run's lease, not a fire: the document decides.
    task = await add(service, "busy", every=60, start=NOW)
    queued = queue_run(task, NOW)
    await store.commit(TaskChange.of(queued))
    lease = NOW + timedelta(seconds=30)
    await store.commit(
        TaskChange.of(start_run(queued.task, queued.run, "w", NOW, lease_until=lease))
    )
    fires = await every_fire(service, end="2026-03-27T12:03:30Z")
    assert [when for when, _ in listed(fires)] == [
        "2026-03-27T12:01:00Z",
        "2026-03-27T12:02:00Z",
        "2026-03-27T12:03:00Z",
    ]


async def test_a_claimed_task_lists_its_fires_before_its_claim_expires(
    service: TaskService, store: MemoryStore
) -> None:
    # A scheduler's claim moves the entry to the claim's expiry, after the task's fires.
    await add(service, "often", every=5, start=NOW)
    await add(service, "later", at=utc("2026-03-27T12:00:20Z"))
    await store.claim_due(now=timestamp(NOW + timedelta(seconds=5)), limit=10, lease=30, token="s")
    fires = await every_fire(service, end="2026-03-27T12:00:21Z", limit=2)
    assert [task_id for _, task_id in listed(fires)] == ["often"] * 3 + ["later", "often"]


async def test_pages_lose_and_repeat_nothing_and_break_ties_by_task_id(
    service: TaskService,
) -> None:
    for task_id in ("m", "a", "z", "k"):
        await add(service, task_id, cron="*/15 * * * *")
    await add(service, "b", every=450, start=NOW)
    await add(service, "once", at=utc("2026-03-27T13:00:00Z"))
    window = ("2026-03-27T12:00:00Z", "2026-03-27T16:00:00Z")

    whole = await every_fire(service, *window, limit=1000)
    # Recurrences start after now (12:00): the first fires are at 12:07:30 and 12:15.
    quarters = [NOW + timedelta(minutes=15 * i) for i in range(1, 16)]
    expected = sorted(
        [(iso(when), task_id) for when in quarters for task_id in "amzk"]
        + [(iso(NOW + timedelta(seconds=450 * i)), "b") for i in range(1, 32)]
        + [("2026-03-27T13:00:00Z", "once")]
    )
    assert listed(whole) == expected
    for limit in (1, 3, 7):
        assert listed(await every_fire(service, *window, limit=limit)) == expected


async def test_a_cursor_keeps_its_window(service: TaskService, clock: Clock) -> None:
    await add(service, "often", every=60, start=NOW)
    fires, cursor = await service.upcoming(start=None, end=None, limit=1, cursor=None)
    assert cursor is not None and iso(fires[0].due_at) == "2026-03-27T12:01:00Z"
    clock.now = NOW + timedelta(hours=1)  # the default window would have moved
    page, _ = await service.upcoming(start=None, end=None, limit=1, cursor=cursor)
    assert iso(page[0].due_at) == "2026-03-27T12:02:00Z"
    with pytest.raises(InvalidWindow, match="another window"):
        await service.upcoming(start="2026-03-27T12:30:00Z", end=None, limit=1, cursor=cursor)


@pytest.mark.parametrize(
    ("start", "end", "cursor", "message"),
    [
        ("2026-03-28T00:00:00Z", "2026-03-27T00:00:00Z", None, "later than `from`"),
        ("2026-03-27T00:00:00Z", "2026-03-27T00:00:00Z", None, "later than `from`"),
        ("2026-03-27T00:00:00Z", "2026-04-04T00:00:01Z", None, "longer than 7 days"),
        ("tomorrow", None, None, "`from` must be an RFC 3339"),
        (None, "2026-03-27T00:00:00", None, "`to` must be an RFC 3339"),  # no offset
        (None, "1712000000", None, "`to` must be an RFC 3339"),
        ("0001-01-01T00:00:00Z", None, None, "years"),
        (None, None, "bm90IGEgY3Vyc29y", "cursor is not one"),
        (None, None, "%%%", "cursor is not one"),
        (None, None, "WzIsMCwxLDAsImEiXQ", "cursor is not one"),  # [2,0,1,0,"a"]: version 2
    ],
)
async def test_bad_windows_and_cursors_are_refused(
    service: TaskService, start: str | None, end: str | None, cursor: str | None, message: str
) -> None:
    with pytest.raises(InvalidWindow, match=message):
        await service.upcoming(start=start, end=end, limit=10, cursor=cursor)


async def test_a_page_reads_a_bounded_number_of_tasks(service: TaskService) -> None:
    # More tasks due before a position than a page reads: a page before it still lists
    # what it safely can, with a cursor; past it, a clear refusal instead of a scan.
    tasks = [
        TaskCreate(id=f"t{i:05d}", name="n", command="true", scheduled_at=NOW + timedelta(hours=1))
        for i in range(MAX_TASKS_PER_PAGE + 1)
    ]
    await service.create_each(tasks)
    await add(service, "early", every=60, start=NOW)
    fires, cursor = await service.upcoming(start=None, end=None, limit=1000, cursor=None)
    assert {fire.task_id for fire in fires} == {"early"}
    assert len(fires) == 59 and cursor is not None  # 12:01 to 12:59; then nothing is safe
    with pytest.raises(TooManyScheduled, match=f"more than {MAX_TASKS_PER_PAGE} tasks"):
        await service.upcoming(start=None, end=None, limit=1000, cursor=cursor)

"""Look-ahead dispatch end to end on the real Redis and RabbitMQ: schedulers fire what is
due within their look-ahead ahead of time, consumers hold it and start it at its due time.
Never early, never twice, and a change before the due time is honoured."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import anyio
import msgspec
import pytest

from app.adapters.amqp_broker import AmqpBroker, delete_amqp_layout, open_amqp_broker
from app.consumer import HELD_ROOM_PER_SLOT, Consumer
from app.domain import Run, RunStatus, Task, TaskNotFound, TaskStatus, utcnow
from app.ports import Broker, Dispatch, Store
from app.scheduler import Scheduler
from app.schemas import ScheduleRequest, TaskCreate
from app.service import TaskService
from tests.brokers import publish_raw
from tests.conftest import AMQP_URL, eventually

LOOKAHEAD = 1.0
ON_TIME = timedelta(seconds=0.25)
"""How late a held run may start here: generous, as the machine is shared."""


@pytest.fixture
async def broker(prefix: str) -> AsyncGenerator[AmqpBroker]:
    try:
        async with open_amqp_broker(AMQP_URL, prefix=prefix) as opened:
            yield opened
    finally:
        with anyio.CancelScope(shield=True):
            await delete_amqp_layout(AMQP_URL, prefix=prefix)


@asynccontextmanager
async def running(
    store: Store,
    broker: Broker,
    *,
    schedulers: int = 1,
    consumers: int = 1,
    lookahead: float = LOOKAHEAD,
    lease: float = 30.0,
    concurrency: int = 4,
) -> AsyncIterator[None]:
    """Schedulers and consumers running in this process until the block ends."""
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        for index in range(consumers):
            consumer = Consumer(
                store,
                broker,
                concurrency=concurrency,
                output_limit=4096,
                shutdown_grace=5,
                lease_seconds=lease,
                worker=f"consumer-{index}",
            )
            await tg.start(consumer.run, stopping)
        for _ in range(schedulers):
            scheduler = Scheduler(store, broker, lease_seconds=lease, lookahead_seconds=lookahead)
            await tg.start(scheduler.run, stopping)
        yield
        stopping.set()


async def one_shot(store: Store, task_id: str, at: datetime, command: str = "true") -> None:
    await TaskService(store).create(
        TaskCreate(id=task_id, name=task_id, command=command, scheduled_at=at)
    )


async def runs_of(store: Store, task_id: str) -> list[Run]:
    return list(reversed((await store.list_runs(task_id, limit=100)).runs))


async def completed(store: Store, task_id: str, count: int = 1) -> list[Run]:
    """The task's runs once ``count`` of them completed."""

    async def done() -> bool:
        runs = await runs_of(store, task_id)
        return sum(run.status == RunStatus.COMPLETED for run in runs) >= count

    await eventually(done, within=20)
    return await runs_of(store, task_id)


async def fired_ahead(store: Store, task_id: str) -> Task:
    """The task once a scheduler fired it ahead of its due time."""

    async def fired() -> bool:
        task = await store.get_task(task_id)
        return task is not None and task.active_run is not None

    await eventually(fired)
    task = await store.get_task(task_id)
    assert task is not None and task.active_run is not None
    assert task.active_run.not_before is not None and task.active_run.not_before > utcnow()
    return task


def skips(caplog: pytest.LogCaptureFixture, run_id: str) -> int:
    """How many deliveries of ``run_id`` a consumer acknowledged without running."""
    return sum(
        record.name == "app.consumer"
        and record.getMessage().startswith("skipping")
        and run_id in record.getMessage()
        for record in caplog.records
    )


def started_late_by(runs: Sequence[Run]) -> list[timedelta]:
    lateness: list[timedelta] = []
    for run in runs:
        assert run.started_at is not None and run.not_before is not None
        lateness.append(run.started_at - run.not_before)
    return lateness


async def test_runs_due_at_staggered_times_start_at_them_never_before(
    store: Store, broker: Broker
) -> None:
    first = utcnow() + timedelta(seconds=1.5)
    dues = {f"at-{i}": first + timedelta(milliseconds=50 * i) for i in range(20)}
    for task_id, due in dues.items():
        await one_shot(store, task_id, due)
    service = TaskService(store)
    await service.create(TaskCreate(id="every", name="every", command="true"))
    start = first + timedelta(seconds=0.02)
    await service.schedule("every", ScheduleRequest(every=1, start=start))

    async with running(store, broker):
        recurring = await completed(store, "every", count=3)
        one_shots = [(await completed(store, task_id))[0] for task_id in dues]

    for task_id, run in zip(dues, one_shots, strict=True):
        assert run.not_before == dues[task_id]  # fired ahead, carrying its due time
    fires = [run.not_before for run in recurring]
    # Each fire of the recurrence once, none skipped, at its own time.
    assert fires[:3] == [start + timedelta(seconds=k) for k in range(3)]
    lateness = started_late_by([*one_shots, *recurring[:3]])
    assert min(lateness) >= timedelta(0)  # never early
    assert max(lateness) < ON_TIME
    assert sorted(lateness)[len(lateness) // 2] < timedelta(seconds=0.05)  # the median


async def test_a_duplicated_dispatch_on_two_consumers_runs_once(
    store: Store, broker: AmqpBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.consumer")
    due = utcnow() + timedelta(seconds=1.5)
    await one_shot(store, "once", due)
    async with running(store, broker, consumers=2):
        task = await fired_ahead(store, "once")
        assert task.active_run is not None
        duplicate = Dispatch(
            task_id="once",
            run_id=task.active_run.run_id,
            attempt=1,
            not_before=due.timestamp(),
        )
        for _ in range(2):
            assert await publish_raw(broker, msgspec.json.encode(duplicate))
        [run] = await completed(store, "once")
        await eventually(lambda: skips(caplog, run.run_id) == 2)
    assert run.started_at is not None and run.started_at >= due


class CrashingBroker:
    """A broker whose scheduler dies around publishing: before the broker has the
    messages, or after it confirmed them but before the claims are released."""

    def __init__(self, broker: Broker, *, after_publish: bool) -> None:
        self._broker = broker
        self._after_publish = after_publish

    async def publish(self, messages: Sequence[Dispatch]) -> list[Dispatch]:
        if self._after_publish:
            await self._broker.publish(messages)
        raise RuntimeError("the scheduler died")


@pytest.mark.parametrize("after_publish", [False, True], ids=["before-publish", "after-publish"])
async def test_a_scheduler_that_dies_within_the_window_gives_one_run(
    store: Store, broker: Broker, after_publish: bool
) -> None:
    due = utcnow() + timedelta(seconds=1)
    await one_shot(store, "once", due)
    crashing = CrashingBroker(broker, after_publish=after_publish)
    dying = Scheduler(store, crashing, lease_seconds=1, lookahead_seconds=2)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        await dying.dispatch_due()
    await fired_ahead(store, "once")
    # Before publishing, its claim runs out and the next scheduler dispatches the same
    # queued run (late); after publishing, the run starts from the first message.
    async with running(store, broker, lease=1):
        [run] = await completed(store, "once")
    assert run.started_at is not None and run.started_at >= due
    assert [r.run_id for r in await runs_of(store, "once")] == [run.run_id]


async def test_a_scheduler_restarted_within_the_window_does_not_fire_again(
    store: Store, broker: Broker
) -> None:
    service = TaskService(store)
    await service.create(TaskCreate(id="every", name="every", command="true"))
    start = utcnow() + timedelta(seconds=1.5)
    await service.schedule("every", ScheduleRequest(every=60, start=start))
    async with running(store, broker, consumers=0, lookahead=3):
        await fired_ahead(store, "every")
    # The first scheduler stopped before the due time; another takes over.
    async with running(store, broker, lookahead=3):
        [run] = await completed(store, "every")
        task = await store.get_task("every")
        assert task is not None and task.scheduled_at == start + timedelta(seconds=60)
    assert run.not_before == start
    assert run.started_at is not None and run.started_at >= start


@pytest.mark.parametrize("change", ["pause", "cancel", "delete", "reschedule", "unschedule"])
async def test_a_change_before_the_due_time_stops_the_fire_dispatched_ahead(
    store: Store, broker: Broker, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.consumer")
    service = TaskService(store)
    due = utcnow() + timedelta(seconds=2)
    await one_shot(store, "t", due)
    later = due + timedelta(seconds=1)
    async with running(store, broker, lookahead=3):
        task = await fired_ahead(store, "t")
        assert task.active_run is not None
        withdrawn = task.active_run.run_id
        match change:
            case "pause":
                await service.pause("t")
            case "cancel":
                await service.cancel("t")
            case "delete":
                await service.delete("t")
            case "reschedule":
                await service.schedule("t", ScheduleRequest(at=later))
            case _:
                await service.unschedule("t")
        assert utcnow() < due  # the change came inside the window
        # The held message comes due and finds nothing to start.
        await eventually(lambda: skips(caplog, withdrawn) == 1)
        if change == "reschedule":
            [*_, run] = await completed(store, "t")
            assert run.started_at is not None and run.started_at >= later
    runs = [] if change == "delete" else await runs_of(store, "t")
    assert all(run.started_at is None for run in runs if run.run_id == withdrawn)
    started = [run for run in runs if run.started_at is not None]
    assert len(started) == (1 if change == "reschedule" else 0)
    if change == "delete":
        with pytest.raises(TaskNotFound):
            await service.get("t")
    else:
        task = await service.get("t")
        assert task.status != TaskStatus.RUNNING and task.active_run is None


async def test_execute_before_the_due_time_runs_now_in_place_of_the_fire_sent_ahead(
    store: Store, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the look-ahead, "execute" 2 s before a one-shot time runs the task now and
    # consumes that time; the fire already sent ahead must not make it a 409 instead.
    caplog.set_level(logging.INFO, logger="app.consumer")
    service = TaskService(store)
    due = utcnow() + timedelta(seconds=2)
    await one_shot(store, "t", due)
    async with running(store, broker, lookahead=3):
        task = await fired_ahead(store, "t")
        assert task.active_run is not None
        withdrawn = task.active_run.run_id
        queued = await service.execute("t")
        assert queued.run_id != withdrawn and queued.not_before is None
        [run] = [r for r in await completed(store, "t") if r.status == RunStatus.COMPLETED]
        assert run.run_id == queued.run_id
        assert run.started_at is not None and run.started_at < due  # now, not at its time
        await eventually(lambda: skips(caplog, withdrawn) == 1)  # the held message
        await anyio.sleep((due - utcnow()).total_seconds() + 0.5)  # past the old time
    runs = await runs_of(store, "t")
    assert [r.run_id for r in runs if r.started_at is not None] == [queued.run_id]
    [skipped] = [r for r in runs if r.run_id == withdrawn]
    assert skipped.status == RunStatus.SKIPPED and "executed" in (skipped.error or "")
    task = await service.get("t")
    assert task.scheduled_at is None and task.active_run is None  # the time was consumed


async def test_an_old_dispatch_without_a_due_time_runs_at_once(
    store: Store, broker: AmqpBroker
) -> None:
    service = TaskService(store)
    await service.create(TaskCreate(id="old", name="old", command="true"))
    queued = await service.execute("old")  # no scheduler runs: we publish its message
    old_body = b'{"task_id":"old","run_id":"%s","attempt":1}' % queued.run_id.encode()
    assert await publish_raw(broker, old_body)
    async with running(store, broker, schedulers=0):
        [run] = await completed(store, "old")
    assert run.run_id == queued.run_id and run.not_before is None


async def test_held_dispatches_take_no_run_slot_from_what_is_due_now(
    store: Store, broker: Broker
) -> None:
    due = utcnow() + timedelta(seconds=2.5)
    held = HELD_ROOM_PER_SLOT  # as many as the prefetch has room for beside one slot
    for index in range(held):
        await one_shot(store, f"later-{index}", due)
    service = TaskService(store)
    await service.create(TaskCreate(id="now", name="now", command="true"))
    async with running(store, broker, concurrency=1, lookahead=3):
        for index in range(held):
            await fired_ahead(store, f"later-{index}")
        await service.execute("now")
        [run] = await completed(store, "now")
        # The one run slot was free: held deliveries wait beside it, not in it.
        assert utcnow() < due
        for index in range(held):
            await completed(store, f"later-{index}")
    assert run.started_at is not None and run.started_at < due


async def test_a_run_lease_within_the_look_ahead_is_not_taken_for_lost(
    store: Store, broker: Broker
) -> None:
    # Its consumer renews the 1 s lease every third of a second: the lease entry is
    # always within the scheduler's look-ahead, and never runs out.
    await one_shot(store, "long", utcnow(), command="sleep 2")
    async with running(store, broker, lease=1, lookahead=1):
        [run] = await completed(store, "long")
    assert run.attempt == 1 and run.error is None

"""The scheduler role on the in-memory adapters (the reference behaviour), on both backends."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest

from app.adapters.memory_broker import MemoryBroker
from app.adapters.memory_store import MemoryStore
from app.domain import (
    DEAD_LETTER_LIMIT,
    DEAD_LETTERED_REASON,
    LOST_RUN_LIMIT,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    fire_schedule,
    start_run,
    timestamp,
    utcnow,
)
from app.ports import DELIVERY_LIMIT, Dispatch, TaskChange
from app.scheduler import Scheduler, plan_dispatch
from app.schemas import TaskCreate
from app.service import TaskService
from tests.brokers import put_raw
from tests.conftest import eventually
from tests.metrics_samples import Samples

LEASE = 30.0


class Clock:
    """A settable wall clock for the scheduler's "now" (``now`` in unix seconds)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


def queued(broker: MemoryBroker) -> list[Dispatch]:
    return [msgspec.json.decode(body, type=Dispatch) for body in broker.queue]


async def new_task(store: MemoryStore, task_id: str, at: datetime | None = None) -> Task:
    spec = TaskCreate(id=task_id, name=task_id, command="true", scheduled_at=at)
    return await TaskService(store).create(spec)


async def test_an_executed_task_is_published_with_its_queued_run(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    await new_task(store, "a")
    run = await TaskService(store).execute("a")
    scheduler = Scheduler(store, broker, lease_seconds=LEASE)
    assert await scheduler.dispatch_due() == 1
    assert queued(broker) == [Dispatch(task_id="a", run_id=run.run_id, attempt=1)]
    # Dispatched: nothing is left to claim, now or after the lease.
    assert await store.claim_due(now=time.time() + 2 * LEASE, limit=10, lease=1, token="x") == []


async def test_a_due_time_queues_one_run_and_publishes_it(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    at = utcnow() - timedelta(seconds=1)
    await new_task(store, "a", at)
    assert await Scheduler(store, broker, lease_seconds=LEASE).dispatch_due() == 1
    task = await store.get_task("a")
    assert task is not None and task.status == TaskStatus.PENDING
    assert task.scheduled_at is None, "a one-shot time is consumed when it fires"
    assert task.active_run is not None
    [run] = (await store.list_runs("a", limit=10)).runs
    assert run.status == RunStatus.QUEUED and run.run_id == task.active_run.run_id
    assert queued(broker) == [Dispatch(task_id="a", run_id=run.run_id, attempt=1)]


async def test_nothing_fires_before_its_time(store: MemoryStore, broker: MemoryBroker) -> None:
    clock = Clock()
    at = datetime.fromtimestamp(clock.now + 10, UTC)
    await new_task(store, "a", at)
    scheduler = Scheduler(store, broker, lease_seconds=LEASE, clock=clock)
    clock.now = timestamp(at) - 0.001
    assert await scheduler.dispatch_due() == 0
    assert queued(broker) == []
    clock.now = timestamp(at)
    assert await scheduler.dispatch_due() == 1
    assert len(queued(broker)) == 1


async def test_a_claim_of_a_dead_scheduler_is_dispatched_once_its_lease_ends(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    clock = Clock()
    await new_task(store, "a", datetime.fromtimestamp(clock.now - 1, UTC))
    # A scheduler claims the entry and dies before doing anything else.
    assert len(await store.claim_due(now=clock.now, limit=10, lease=LEASE, token="dead")) == 1
    survivor = Scheduler(store, broker, lease_seconds=LEASE, clock=clock)
    clock.now += LEASE - 1
    assert await survivor.dispatch_due() == 0, "the claim still holds"
    clock.now += 2
    assert await survivor.dispatch_due() == 1
    assert len(queued(broker)) == 1


async def test_a_run_queued_by_a_dead_scheduler_is_published_again_not_duplicated(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    clock = Clock()
    await new_task(store, "a", datetime.fromtimestamp(clock.now - 1, UTC))
    # The dead scheduler claimed, moved the task to pending with a run, then died
    # before its publish was confirmed.
    [claim] = await store.claim_due(now=clock.now, limit=10, lease=LEASE, token="dead")
    assert claim.task is not None
    fired = fire_schedule(claim.task, utcnow())
    run = fired.run
    await store.commit(TaskChange.of(fired))

    clock.now += LEASE + 1
    assert await Scheduler(store, broker, lease_seconds=LEASE, clock=clock).dispatch_due() == 1
    assert queued(broker) == [Dispatch(task_id="a", run_id=run.run_id, attempt=1)]
    assert [r.run_id for r in (await store.list_runs("a", limit=10)).runs] == [run.run_id]


async def test_unconfirmed_dispatches_stay_claimed_and_are_retried(store: MemoryStore) -> None:
    class ConfirmsFirstOnly(MemoryBroker):
        async def publish(self, messages: Sequence[Dispatch]) -> list[Dispatch]:
            return await super().publish(messages[:1])

    clock = Clock()
    broker = ConfirmsFirstOnly()
    for task_id in ("a", "b"):
        await new_task(store, task_id, datetime.fromtimestamp(clock.now - 1, UTC))
    scheduler = Scheduler(store, broker, lease_seconds=LEASE, clock=clock)
    assert await scheduler.dispatch_due() == 2
    assert [d.task_id for d in queued(broker)] == ["a"]
    clock.now += LEASE + 1
    assert await scheduler.dispatch_due() == 1
    assert [d.task_id for d in queued(broker)] == ["a", "b"]


async def test_entries_of_deleted_tasks_are_dropped(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    task = await new_task(store, "a", utcnow() - timedelta(seconds=1))
    claims = await store.claim_due(now=time.time(), limit=10, lease=0.001, token="t")
    assert len(claims) == 1
    await store.commit(TaskChange("a", task.revision, None))
    assert await Scheduler(store, broker, lease_seconds=LEASE).dispatch_due() == 0
    assert queued(broker) == []


async def test_a_task_changed_between_claim_and_commit_is_still_dispatched(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    class RenamingStore(MemoryStore):
        """Renames the task right after the claim read it, as a concurrent API call would."""

        async def claim_due(self, **kwargs: object):  # type: ignore[no-untyped-def, override]
            claims = await super().claim_due(**kwargs)  # type: ignore[arg-type]
            for claim in claims:
                assert claim.task is not None
                renamed = msgspec.structs.replace(
                    claim.task, name="renamed", revision=claim.task.revision + 1
                )
                await self.commit(TaskChange(claim.task_id, claim.task.revision, renamed))
            return claims

    racing = RenamingStore(run_history=10)
    await new_task(racing, "a", utcnow() - timedelta(seconds=1))
    assert await Scheduler(racing, broker, lease_seconds=LEASE).dispatch_due() == 1
    task = await racing.get_task("a")
    assert task is not None and task.name == "renamed" and task.status == TaskStatus.PENDING
    assert len(queued(broker)) == 1


async def test_two_schedulers_fire_each_due_time_once(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    at = utcnow() - timedelta(seconds=1)
    for n in range(300):
        await new_task(store, f"t{n:03}", at)
    schedulers = [Scheduler(store, broker, lease_seconds=LEASE, batch_size=7) for _ in range(2)]

    async def drain(scheduler: Scheduler) -> None:
        while await scheduler.dispatch_due():
            pass

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for scheduler in schedulers:
                tg.start_soon(drain, scheduler)
    assert sorted(d.task_id for d in queued(broker)) == [f"t{n:03}" for n in range(300)]


async def test_the_running_loop_sleeps_until_the_due_time_and_wakes_for_earlier_ones(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(Scheduler(store, broker, lease_seconds=LEASE).run, stopping)
        # Scheduled far away first, so the loop goes to sleep for a long time ...
        await new_task(store, "late", utcnow() + timedelta(hours=1))
        # ... then an earlier time must wake it.
        at = utcnow() + timedelta(milliseconds=300)
        await new_task(store, "soon", at)
        async with broker.consume(prefetch=1) as deliveries:
            with anyio.fail_after(5):
                delivery = await anext(deliveries)
            fired = utcnow()
            await delivery.ack()
        assert delivery.dispatch is not None and delivery.dispatch.task_id == "soon"
        assert at <= fired < at + timedelta(milliseconds=200)
        assert queued(broker) == []
        stopping.set()


async def start_running(store: MemoryStore, task_id: str, *, lease_until: float) -> Run:
    """Bring a task to running as a consumer would, with its lease entry."""
    await new_task(store, task_id)
    await TaskService(store).execute(task_id)
    task = await store.get_task(task_id)
    assert task is not None and task.active_run is not None
    queued_run = await store.get_run(task_id, task.active_run.run_id)
    assert queued_run is not None
    lease = datetime.fromtimestamp(lease_until, UTC)
    started = start_run(task, queued_run, "host:4242", utcnow(), lease_until=lease)
    await store.commit(TaskChange.of(started))
    return started.run


async def test_a_run_whose_lease_ran_out_is_recovered_as_the_next_attempt(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    clock = Clock()
    lost = await start_running(store, "a", lease_until=clock.now + 30)
    scheduler = Scheduler(store, broker, lease_seconds=LEASE, clock=clock)
    clock.now += 29
    assert await scheduler.dispatch_due() == 0, "the lease still holds"
    clock.now += 2
    assert await scheduler.dispatch_due() == 1
    task = await store.get_task("a")
    assert task is not None and task.status == TaskStatus.PENDING
    fresh, old = (await store.list_runs("a", limit=10)).runs
    assert old.run_id == lost.run_id and old.status == RunStatus.FAILED
    assert old.error == "lost: worker host:4242 stopped renewing its lease"
    assert fresh.status == RunStatus.QUEUED and fresh.attempt == 2
    assert queued(broker) == [Dispatch(task_id="a", run_id=fresh.run_id, attempt=2)]


async def test_a_task_whose_runs_keep_being_lost_fails_after_the_limit(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    clock = Clock()
    await start_running(store, "a", lease_until=clock.now)
    scheduler = Scheduler(store, broker, lease_seconds=LEASE, clock=clock)
    for attempt in range(2, LOST_RUN_LIMIT + 1):
        assert await scheduler.dispatch_due() == 1
        task = await store.get_task("a")
        assert task is not None and task.active_run is not None
        assert task.active_run.attempt == attempt
        # The next worker dies too: start the queued run, never renew its lease.
        queued_run = await store.get_run("a", task.active_run.run_id)
        assert queued_run is not None
        started = start_run(task, queued_run, "host:4242", utcnow(), lease_until=clock())
        await store.commit(TaskChange.of(started))
    assert await scheduler.dispatch_due() == 1
    task = await store.get_task("a")
    assert task is not None and task.status == TaskStatus.FAILED and task.active_run is None
    assert task.last_run is not None and task.last_run.attempt == LOST_RUN_LIMIT
    assert len(queued(broker)) == LOST_RUN_LIMIT - 1
    assert await store.claim_due(now=clock.now + 3600, limit=10, lease=1, token="t") == []


async def test_right_after_a_store_outage_expired_leases_are_extended_not_taken(
    store: MemoryStore,
) -> None:
    now = time.time()
    running = await start_running(store, "a", lease_until=now - 1)
    task = await store.get_task("a")
    assert task is not None
    moment = datetime.fromtimestamp(now, UTC)
    plan = plan_dispatch(task, moment, running, extend_lease_to=moment + timedelta(seconds=LEASE))
    assert plan.dispatch is None and plan.change is not None
    await store.commit(TaskChange.of(plan.change))
    task = await store.get_task("a")
    assert task is not None and task.status == TaskStatus.RUNNING
    assert await store.claim_due(now=now + LEASE - 1, limit=10, lease=1, token="t") == []
    extended = await store.claim_due(now=now + LEASE + 0.001, limit=10, lease=1, token="t")
    assert [c.task_id for c in extended] == ["a"]


async def churn(broker: MemoryBroker) -> None:
    """Consumers take the one message and stop before starting its run, until the broker
    gives up on it."""
    for _ in range(DELIVERY_LIMIT + 1):
        async with broker.consume(prefetch=1) as deliveries:
            await anext(deliveries)
    assert len(broker.dead_letters) == 1 and not broker.queue


async def test_a_dead_lettered_dispatch_is_sent_again_then_its_run_fails(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    service = TaskService(store)
    await service.create(TaskCreate(id="t", name="t", command="true", max_attempts=2))
    first = await service.execute("t")
    clock = Clock()
    scheduler = Scheduler(store, broker, lease_seconds=LEASE, clock=clock)
    counted = Samples("taskq_scheduler_dead_letters_total", "taskq_scheduler_dispatches_total")
    not_started = Samples(("taskq_runs_finished_total", {"outcome": "not_started"}))
    assert await scheduler.dispatch_due() == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.reap_dead_letters)
        for round_ in range(1, DEAD_LETTER_LIMIT + 1):
            await churn(broker)
            await eventually(lambda: not broker.dead_letters)
            run = await store.get_run("t", first.run_id)
            assert run is not None and run.dead_letters == round_
            if round_ < DEAD_LETTER_LIMIT:
                assert run.status == RunStatus.QUEUED
                # Sent again one lease period later, not at once.
                assert await scheduler.dispatch_due() == 0
                clock.now += LEASE
                assert await scheduler.dispatch_due() == 1
                assert queued(broker) == [Dispatch(task_id="t", run_id=first.run_id, attempt=1)]
        await eventually(lambda: counted.changes()[0] == DEAD_LETTER_LIMIT)
        tg.cancel_scope.cancel()
    # Sent DEAD_LETTER_LIMIT times, handled as often, then the run did not start.
    assert counted.changes() == [DEAD_LETTER_LIMIT, DEAD_LETTER_LIMIT]
    assert not_started.changes() == [1]
    failed = await store.get_run("t", first.run_id)
    assert failed is not None
    assert failed.status == RunStatus.FAILED and failed.error == DEAD_LETTERED_REASON
    task = await store.get_task("t")
    # The task goes on as after any failed attempt: here, its second attempt.
    assert task is not None and task.status == TaskStatus.PENDING
    assert task.active_run is not None and task.active_run.attempt == 2
    assert task.retry_at is not None


async def test_a_dead_letter_for_a_run_that_moved_on_changes_nothing(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    service = TaskService(store)
    await service.create(TaskCreate(id="t", name="t", command="true"))
    first = await service.execute("t")
    await service.cancel("t")
    before = await store.get_task("t")
    put_raw(broker, msgspec.json.encode(Dispatch(task_id="t", run_id=first.run_id, attempt=1)))
    put_raw(broker, b"not a dispatch")
    async with broker.consume(prefetch=2) as deliveries:
        for delivery in [await anext(deliveries), await anext(deliveries)]:
            await delivery.dead_letter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(Scheduler(store, broker, lease_seconds=30).reap_dead_letters)
        await eventually(lambda: not broker.dead_letters)
        tg.cancel_scope.cancel()
    assert await store.get_task("t") == before


async def test_a_look_ahead_fires_what_is_due_within_it_carrying_the_due_time(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    clock = Clock()
    at = datetime.fromtimestamp(clock.now + 0.5, UTC)
    await new_task(store, "a", at)
    # Without a look-ahead (today's behaviour), nothing due in half a second fires.
    assert await Scheduler(store, broker, lease_seconds=LEASE, clock=clock).dispatch_due() == 0
    assert queued(broker) == []
    ahead = Scheduler(store, broker, lease_seconds=LEASE, lookahead_seconds=1, clock=clock)
    assert await ahead.dispatch_due() == 1
    [dispatch] = queued(broker)
    assert dispatch.not_before == timestamp(at)
    task = await store.get_task("a")
    assert task is not None and task.active_run is not None
    assert task.active_run.not_before == at and task.status == TaskStatus.PENDING


async def test_a_burst_due_within_the_look_ahead_goes_out_in_batches_each_once(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    clock = Clock()
    at = datetime.fromtimestamp(clock.now + 0.5, UTC)
    for n in range(1000):
        await new_task(store, f"t{n:04}", at)
    scheduler = Scheduler(
        store, broker, lease_seconds=LEASE, lookahead_seconds=1, batch_size=100, clock=clock
    )
    batches = [await scheduler.dispatch_due() for _ in range(11)]
    assert batches == [100] * 10 + [0]
    dispatches = queued(broker)
    assert len({d.task_id for d in dispatches}) == len(dispatches) == 1000
    assert {d.not_before for d in dispatches} == {timestamp(at)}


async def test_a_dead_letter_of_a_task_that_cannot_be_read_is_dropped(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    service = TaskService(store)
    await service.create(TaskCreate(id="t", name="t", command="true"))
    first = await service.execute("t")
    store._tasks["t"] = b"spoiled"  # pyright: ignore[reportPrivateUsage]
    put_raw(broker, msgspec.json.encode(Dispatch(task_id="t", run_id=first.run_id, attempt=1)))
    async with broker.consume(prefetch=1) as deliveries:
        await (await anext(deliveries)).dead_letter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(Scheduler(store, broker, lease_seconds=30).reap_dead_letters)
        await eventually(lambda: not broker.dead_letters)
        tg.cancel_scope.cancel()
    assert store._tasks["t"] == b"spoiled"  # pyright: ignore[reportPrivateUsage]


class SpoiledOnCommit(MemoryStore):
    """A memory store whose task ``t`` is spoiled just before the first ``commit_each``:
    a hand edit between a scheduler's claim and its commit."""

    spoil_next = True

    async def commit_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        if self.spoil_next:
            self.spoil_next = False
            self._tasks["t"] = b"spoiled"
        return await super().commit_each(changes)


async def test_a_claimed_task_that_cannot_be_read_when_planned_again_loses_its_entry(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    store = SpoiledOnCommit(run_history=10)
    # Due now: its dispatch commits a queued run first.
    await TaskService(store).create(
        TaskCreate(id="t", name="t", command="true", scheduled_at=utcnow())
    )
    scheduler = Scheduler(store, broker, lease_seconds=LEASE)

    with caplog.at_level(logging.ERROR, logger="app.scheduler"):
        assert await scheduler.dispatch_due() == 1

    assert not broker.queue
    [record] = caplog.records
    assert "task 't'" in record.getMessage() and "entry is dropped" in record.getMessage()
    assert store._tasks["t"] == b"spoiled", "left as it is"  # pyright: ignore[reportPrivateUsage]
    later = time.time() + 2 * LEASE
    assert await store.claim_due(now=later, limit=10, lease=1, token="x") == []

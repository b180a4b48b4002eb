"""The roles meeting a task whose active run's stored document cannot be read (a hand
edit in Redis, another version's format): they log it and go on with the other tasks,
and the task itself is neither lost nor changed (on the memory store and on Redis)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest

from app.adapters.memory_broker import MemoryBroker
from app.chains import chained_change
from app.consumer import Consumer
from app.domain import (
    Chain,
    Outcome,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    finish_run,
    queue_run,
    start_run,
)
from app.ports import Dispatch, Store, TaskChange
from app.scheduler import Scheduler
from app.schemas import TaskCreate
from app.service import TaskService
from tests.conftest import eventually
from tests.contract.test_unreadable_runs_contract import spoil_run
from tests.integration.test_unreadable_tasks import opened

LEASE = 30.0
ADAPTERS = pytest.mark.parametrize("adapter", ["memory", "redis"])


async def read_task(store: Store, task_id: str) -> Task:
    task = await store.get_task(task_id)
    assert task is not None
    return task


async def running(store: Store, task_id: str, *, lease_until: float) -> Run:
    """A task brought to running as a consumer would, its lease running out then."""
    service = TaskService(store)
    await service.create(TaskCreate(id=task_id, name=task_id, command="true"))
    queued = await service.execute(task_id)
    task = await read_task(store, task_id)
    lease = datetime.fromtimestamp(lease_until, UTC)
    started = start_run(task, queued, "gone-worker", task.updated_at, lease_until=lease)
    await store.commit(TaskChange.of(started))
    return started.run


@ADAPTERS
async def test_the_scheduler_recovers_a_lost_run_it_cannot_read_and_runs_the_task_again(
    adapter: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(adapter, prefix) as store:
        now = time.time()
        run = await running(store, "bad", lease_until=now - 1)  # its worker died
        await spoil_run(store, "bad", run.run_id)
        service = TaskService(store)
        await service.create(TaskCreate(id="good", name="good", command="true"))
        good = await service.execute("good")
        broker = MemoryBroker()

        with caplog.at_level(logging.ERROR):
            assert await Scheduler(store, broker, lease_seconds=LEASE).dispatch_due() == 2

        [error] = [r for r in caplog.records if run.run_id in r.getMessage()]
        assert "cannot be read" in error.getMessage() and error.exc_info is None
        task = await read_task(store, "bad")
        assert task.status == TaskStatus.PENDING and task.active_run is not None
        assert task.active_run.attempt == 2
        dispatched = [msgspec.json.decode(body, type=Dispatch) for body in broker.queue]
        assert sorted(d.run_id for d in dispatched) == sorted([good.run_id, task.active_run.run_id])
        history = await store.list_runs("bad", limit=10)
        assert history.unreadable == [], "the unreadable document is replaced"
        lost = next(r for r in history.runs if r.run_id == run.run_id)
        assert (lost.status, lost.attempt) == (RunStatus.FAILED, 1)
        assert lost.error is not None and lost.error.startswith("lost:")
        assert "its stored document could not be read: " in lost.error


@ADAPTERS
async def test_the_scheduler_leaves_a_running_task_whose_lease_has_not_run_out(
    adapter: str, prefix: str
) -> None:
    async with opened(adapter, prefix) as store:
        now = time.time()
        run = await running(store, "bad", lease_until=now + 5)  # its worker renews it
        await spoil_run(store, "bad", run.run_id)
        broker = MemoryBroker()
        scheduler = Scheduler(store, broker, lease_seconds=LEASE, lookahead_seconds=10)

        assert await scheduler.dispatch_due() == 1  # claimed within the look-ahead

        assert not broker.queue
        task = await read_task(store, "bad")
        assert task.status == TaskStatus.RUNNING and task.active_run is not None
        assert task.active_run.run_id == run.run_id, "still running the same run"
        history = await store.list_runs("bad", limit=10)
        assert history.unreadable == [run.run_id]
        # Its entry is its lease again, due when the lease ends.
        assert await store.claim_due(now=now + 4, limit=10, lease=1, token="t") == []
        [again] = await store.claim_due(now=now + 6, limit=10, lease=1, token="t")
        assert again.task_id == "bad"


@ADAPTERS
async def test_a_consumer_skips_a_dispatch_whose_run_it_cannot_read_and_goes_on(
    adapter: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(adapter, prefix) as store:
        broker = MemoryBroker()
        service = TaskService(store)
        for task_id in ("bad", "good"):
            await service.create(TaskCreate(id=task_id, name=task_id, command="true"))
        bad = await service.execute("bad")
        await spoil_run(store, "bad", bad.run_id)
        await service.execute("good")
        assert await Scheduler(store, broker, lease_seconds=LEASE).dispatch_due() == 2
        consumer = Consumer(
            store, broker, concurrency=2, output_limit=4096, shutdown_grace=5, lease_seconds=LEASE
        )

        async def good_ended() -> bool:
            return (await read_task(store, "good")).status == TaskStatus.COMPLETED

        def bad_skipped() -> bool:
            return any("skipping" in r.getMessage() for r in caplog.records)

        with caplog.at_level(logging.INFO):
            async with anyio.create_task_group() as tg:
                stopping = anyio.Event()
                await tg.start(consumer.run, stopping)
                await eventually(good_ended)
                await eventually(bad_skipped)
                stopping.set()

        [warning] = [r for r in caplog.records if "cannot be read" in r.getMessage()]
        assert bad.run_id in warning.getMessage() and warning.levelno == logging.WARNING
        assert not broker.queue
        task = await read_task(store, "bad")
        assert task.status == TaskStatus.PENDING and task.active_run is not None
        assert task.active_run.run_id == bad.run_id, "still there, as it was"


@ADAPTERS
async def test_cancelling_it_lets_its_task_run_again(adapter: str, prefix: str) -> None:
    async with opened(adapter, prefix) as store:
        broker = MemoryBroker()
        service = TaskService(store)
        await service.create(TaskCreate(id="bad", name="bad", command="true"))
        stuck = await service.execute("bad")
        await spoil_run(store, "bad", stuck.run_id)

        assert (await service.cancel("bad")).status == TaskStatus.CANCELLED
        again = await service.execute("bad")
        assert await Scheduler(store, broker, lease_seconds=LEASE).dispatch_due() == 1
        consumer = Consumer(
            store, broker, concurrency=1, output_limit=4096, shutdown_grace=5, lease_seconds=LEASE
        )

        async def ran() -> bool:
            return (await read_task(store, "bad")).status == TaskStatus.COMPLETED

        async with anyio.create_task_group() as tg:
            stopping = anyio.Event()
            await tg.start(consumer.run, stopping)
            await eventually(ran)
            stopping.set()

        history = await store.list_runs("bad", limit=10)
        assert [(run.run_id, run.status) for run in history.runs] == [
            (again.run_id, RunStatus.COMPLETED),
            (stuck.run_id, RunStatus.CANCELLED),
        ]
        assert history.unreadable == []


@ADAPTERS
@pytest.mark.parametrize("ahead", [False, True], ids=["queued", "fired-ahead"])
async def test_a_chain_to_a_task_whose_active_run_cannot_be_read_defers_the_trigger(
    adapter: str, prefix: str, ahead: bool
) -> None:
    """Its active run cannot be withdrawn nor read again: the target counts as busy."""
    async with opened(adapter, prefix) as store:
        service = TaskService(store)
        await service.create(TaskCreate(id="b", name="b", command="true"))
        await service.create(
            TaskCreate(id="a", name="a", command="true", chain=Chain(on_success=["b"]))
        )
        queued_b = await service.execute("b")
        if ahead:  # as a fire dispatched ahead of its due time, an hour from now
            b = await read_task(store, "b")
            assert b.active_run is not None
            later = b.updated_at + timedelta(hours=1)
            active = msgspec.structs.replace(b.active_run, not_before=later)
            moved = msgspec.structs.replace(b, revision=b.revision + 1, active_run=active)
            await store.commit(TaskChange("b", b.revision, moved))
        await spoil_run(store, "b", queued_b.run_id)
        a = await read_task(store, "a")
        at = a.updated_at
        queued_a = queue_run(a, at)
        started = start_run(queued_a.task, queued_a.run, "w", at, lease_until=at)
        done = Outcome(exit_code=0, duration=0.1, output="", truncated=False)

        with anyio.fail_after(5):
            _, [planned] = await chained_change(
                store, finish_run(started.task, started.run, done, at)
            )

        assert planned.task_id == "b" and planned.task.chain_waiting is not None
        assert planned.task.active_run == (await read_task(store, "b")).active_run

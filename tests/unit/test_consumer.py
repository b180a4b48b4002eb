"""The consumer role on the in-memory adapters with real child processes, on both backends."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from app.adapters.memory_broker import MemoryBroker
from app.adapters.memory_store import MemoryStore
from app.consumer import Consumer, RunningCommands
from app.domain import Run, RunStatus, Task, TaskStatus, utcnow
from app.ports import DEFAULT_QUEUE, Dispatch
from app.scheduler import Scheduler
from app.schemas import ScheduleRequest, TaskCreate, TaskUpdate
from app.service import TaskService
from tests.brokers import put_raw
from tests.conftest import eventually


@asynccontextmanager
async def consuming(
    store: MemoryStore,
    broker: MemoryBroker,
    *,
    concurrency: int = 4,
    grace: float = 5.0,
    lease: float = 30.0,
) -> AsyncGenerator[anyio.Event]:
    """A consumer running until the block ends; set the yielded event to stop it early."""
    stopping = anyio.Event()
    consumer = Consumer(
        store,
        broker,
        concurrency=concurrency,
        output_limit=4096,
        shutdown_grace=grace,
        lease_seconds=lease,
        worker="test-worker",
    )
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run, stopping)
        yield stopping
        stopping.set()


async def submit(store: MemoryStore, broker: MemoryBroker, task_id: str, command: str) -> Run:
    """Create and execute a task, and let a scheduler dispatch it."""
    service = TaskService(store)
    await service.create(TaskCreate(id=task_id, name=task_id, command=command))
    run = await service.execute(task_id)
    assert await Scheduler(store, broker, lease_seconds=30).dispatch_due() == 1
    return run


async def finished(store: MemoryStore, task_id: str) -> Task:
    """The task once it left pending/running (the store's state is what we observe)."""

    async def idle() -> bool:
        task = await store.get_task(task_id)
        return task is not None and task.status not in (TaskStatus.PENDING, TaskStatus.RUNNING)

    await eventually(idle)
    task = await store.get_task(task_id)
    assert task is not None
    return task


async def test_a_command_runs_and_its_run_is_recorded(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    async with consuming(store, broker):
        queued = await submit(store, broker, "a", "echo out; echo err >&2")
        task = await finished(store, "a")
    assert task.status == TaskStatus.COMPLETED
    assert task.active_run is None
    assert task.last_run is not None and task.last_run.exit_code == 0
    run = await store.get_run("a", queued.run_id)
    assert run is not None
    assert run.status == RunStatus.COMPLETED
    assert run.output == "out\nerr\n"
    assert run.worker == "test-worker"
    assert run.started_at is not None and run.finished_at is not None
    assert run.queued_at <= run.started_at <= run.finished_at
    assert not broker.queue and not broker.dead_letters


async def test_a_failing_command_fails_the_task(store: MemoryStore, broker: MemoryBroker) -> None:
    async with consuming(store, broker):
        await submit(store, broker, "a", "echo bad; exit 3")
        task = await finished(store, "a")
    assert task.status == TaskStatus.FAILED
    assert task.last_run is not None and task.last_run.exit_code == 3
    [run] = (await store.list_runs("a", limit=10)).runs
    assert (run.status, run.exit_code, run.output) == (RunStatus.FAILED, 3, "bad\n")


async def test_a_duplicate_message_does_not_run_the_command_twice(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    async with consuming(store, broker, concurrency=1):
        run = await submit(store, broker, "a", f"echo once >> {ran}")
        # The same dispatch again, as after a scheduler retry or a redelivery.
        await broker.publish([Dispatch(task_id="a", run_id=run.run_id, attempt=1)])
        await finished(store, "a")
        await eventually(lambda: not broker.queue)
    assert ran.read_text() == "once\n"
    assert [r.run_id for r in (await store.list_runs("a", limit=10)).runs] == [run.run_id]


async def test_a_message_for_a_deleted_task_is_acknowledged_and_skipped(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    run = await submit(store, broker, "a", "true")
    await TaskService(store).delete("a")
    async with consuming(store, broker):
        await eventually(lambda: not broker.queue)
    assert not broker.dead_letters
    assert await store.get_run("a", run.run_id) is None


async def test_an_undecodable_message_is_dead_lettered(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    put_raw(broker, b"not a dispatch")
    async with consuming(store, broker):
        await eventually(lambda: bool(broker.dead_letters))
    assert broker.dead_letters == [b"not a dispatch"]


async def test_no_more_than_concurrency_commands_run_at_once(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    async with consuming(store, broker, concurrency=2):
        for n in range(6):
            await submit(
                store, broker, f"t{n}", f"echo start >> {log}; sleep 0.2; echo end >> {log}"
            )
        for n in range(6):
            await finished(store, f"t{n}")
    running = peak = 0
    for line in log.read_text().split():
        running += 1 if line == "start" else -1
        peak = max(peak, running)
    assert peak == 2


async def test_shutdown_lets_a_short_command_finish(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    async with consuming(store, broker, grace=5) as stopping:
        await submit(store, broker, "a", f"touch {started}; sleep 0.5; echo done")
        await eventually(started.exists)
        stopping.set()
    task = await store.get_task("a")
    assert task is not None and task.status == TaskStatus.COMPLETED
    [run] = (await store.list_runs("a", limit=10)).runs
    assert run.output == "done\n"


async def test_shutdown_requeues_a_command_still_running_after_the_grace_period(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    async with consuming(store, broker, grace=0.3) as stopping:
        first = await submit(store, broker, "a", f"touch {started}; sleep 60")
        await eventually(started.exists)
        stopping.set()
    task = await store.get_task("a")
    assert task is not None
    assert task.status == TaskStatus.PENDING, "given back for another consumer"
    fresh, interrupted = (await store.list_runs("a", limit=10)).runs
    assert interrupted.run_id == first.run_id
    assert interrupted.status == RunStatus.CANCELLED
    assert interrupted.error == "worker shut down"
    assert fresh.status == RunStatus.QUEUED
    assert task.active_run is not None and task.active_run.run_id == fresh.run_id
    # ... and it is due for dispatch right away.
    claims = await store.claim_due(
        now=(utcnow() + timedelta(seconds=1)).timestamp(), limit=10, lease=30, token="t"
    )
    assert [c.task_id for c in claims] == ["a"]


async def test_a_time_set_while_running_becomes_due_when_the_run_ends(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    at = utcnow() + timedelta(hours=1)
    async with consuming(store, broker):
        await submit(store, broker, "a", f"touch {started}; sleep 0.3")
        await eventually(started.exists)
        await TaskService(store).schedule("a", ScheduleRequest(at=at))

        async def ran() -> bool:
            task = await store.get_task("a")
            return task is not None and task.last_run is not None

        await eventually(ran)
    task = await store.get_task("a")
    # Its run completed, and it waits for the time set meanwhile: pending, with no run yet.
    assert task is not None and task.last_run is not None
    assert task.last_run.status == RunStatus.COMPLETED and task.active_run is None
    assert task.status == TaskStatus.PENDING and task.scheduled_at == at
    before = at.timestamp() - 1
    assert await store.claim_due(now=before, limit=10, lease=30, token="t") == []
    claims = await store.claim_due(now=at.timestamp(), limit=10, lease=30, token="t")
    assert [c.task_id for c in claims] == ["a"]


async def test_the_lease_of_a_running_command_is_renewed_until_it_ends(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    lease = 0.6
    async with consuming(store, broker, lease=lease):
        await submit(store, broker, "a", f"touch {started}; sleep {4 * lease}")
        await eventually(started.exists)
        # Past several lease periods, no scheduler may take the run for lost.
        for _ in range(6):
            await anyio.sleep(lease / 2)
            assert await store.claim_due(now=time.time(), limit=10, lease=30, token="t") == []
        task = await finished(store, "a")
    assert task.status == TaskStatus.COMPLETED
    # The run is over: its lease entry is gone.
    assert await store.claim_due(now=time.time() + 3600, limit=10, lease=30, token="t") == []


async def test_a_cancel_stops_the_running_command_and_records_it(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    async with consuming(store, broker):
        run = await submit(store, broker, "a", f"touch {started}; sleep 60")
        await eventually(started.exists)
        requested = await TaskService(store).cancel("a")
        assert requested.status == TaskStatus.RUNNING and requested.cancel_requested
        with anyio.fail_after(2):
            task = await finished(store, "a")
    assert task.status == TaskStatus.CANCELLED and not task.cancel_requested
    cancelled = await store.get_run("a", run.run_id)
    assert cancelled is not None and cancelled.status == RunStatus.CANCELLED


async def test_a_cancel_notice_that_comes_before_its_command_stops_it_when_it_starts() -> None:
    now = utcnow()
    task = Task(id="a", name="a", command="true", created_at=now, updated_at=now)
    run = Run(run_id="r1", task_id="a", attempt=1, status=RunStatus.RUNNING, queued_at=now)
    commands = RunningCommands()
    commands.stop("r1")  # the start was recorded, the command not registered yet
    with commands.register(task, run) as stop:
        assert stop.cancel_called and commands.task_ids() == ["a"]
    assert commands.task_ids() == []
    with commands.register(task, run) as again:
        assert not again.cancel_called, "a notice stops one command, once"


STORE_CALLS = ("get_task_and_run", "get_tasks_and_runs", "commit", "commit_each")
"""The store calls a consumer makes for a run (a round trip each)."""


def count_round_trips(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch, *, latency: float
) -> list[str]:
    """Record every round trip the store serves from now on, each taking ``latency``
    seconds, as a store a network hop away would."""
    calls: list[str] = []
    serving = ContextVar("serving", default=False)  # the memory store calls itself

    for name in STORE_CALLS:
        call = getattr(store, name)

        async def counted(*args: Any, __name: str = name, __call: Any = call) -> Any:
            if serving.get():
                return await __call(*args)
            calls.append(__name)
            serving.set(True)
            try:
                await anyio.sleep(latency)
                return await __call(*args)
            finally:
                serving.set(False)

        monkeypatch.setattr(store, name, counted)
    return calls


async def test_concurrent_runs_share_their_store_round_trips(
    store: MemoryStore, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One call each would be three round trips per run: read, start, finish.
    runs = 8
    for n in range(runs):
        await submit(store, broker, f"t{n}", "true")
    calls = count_round_trips(store, monkeypatch, latency=0.01)
    async with consuming(store, broker, concurrency=runs):
        for n in range(runs):
            task = await finished(store, f"t{n}")
            assert task.status == TaskStatus.COMPLETED
    assert 0 < len(calls) <= 2 * runs, calls


class PrefetchRecordingBroker(MemoryBroker):
    """The memory broker, remembering the prefetch each consumer asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.prefetches: list[int] = []

    def consume(self, *, prefetch: int, queue: str = DEFAULT_QUEUE):  # type: ignore[no-untyped-def]
        self.prefetches.append(prefetch)
        return super().consume(prefetch=prefetch, queue=queue)


async def test_the_prefetch_has_room_for_held_deliveries_only_when_asked(
    store: MemoryStore,
) -> None:
    broker = PrefetchRecordingBroker()
    for held_room in (None, 0):
        stopping = anyio.Event()
        consumer = Consumer(
            store,
            broker,
            concurrency=4,
            output_limit=4096,
            shutdown_grace=1,
            lease_seconds=30,
            held_room=held_room,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(consumer.run, stopping)
            stopping.set()
    # Room for twice as many held deliveries as run slots; none without a look-ahead.
    assert broker.prefetches == [12, 4]


def record_reads(store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task ids whose dispatched runs the consumer reads from now on, in order."""
    read: list[str] = []
    read_and_commit_each = store.read_and_commit_each

    async def recorded(pairs: Any, changes: Any) -> Any:
        read.extend(task_id for task_id, _ in pairs)
        return await read_and_commit_each(pairs, changes)

    monkeypatch.setattr(store, "read_and_commit_each", recorded)
    return read


def blocking(started: Path, go: Path) -> str:
    """A command that says it started, then runs until ``go`` exists."""
    return f"touch {started}; while [ ! -e {go} ]; do sleep 0.01; done"


async def test_runs_waiting_for_a_slot_are_read_while_they_wait_and_start_in_turn(
    store: MemoryStore, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    await submit(store, broker, "first", blocking(started, go))
    waiting = [f"w{n}" for n in range(3)]  # as many as the prefetch has room for
    for task_id in waiting:
        await submit(store, broker, task_id, "true")
    read = record_reads(store, monkeypatch)
    async with consuming(store, broker, concurrency=1):
        await eventually(started.exists)
        # The one slot is busy, yet the runs behind it are read already.
        await eventually(lambda: set(waiting) <= set(read))
        for task_id in waiting:
            task = await store.get_task(task_id)
            assert task is not None and task.status == TaskStatus.PENDING
        go.touch()
        tasks = [await finished(store, task_id) for task_id in waiting]
    assert all(task.status == TaskStatus.COMPLETED for task in tasks)
    runs = [(await store.list_runs(task_id, limit=1)).runs[0] for task_id in waiting]
    starts = [run.started_at for run in runs]
    assert None not in starts and starts == sorted(starts), "in the order they came"  # type: ignore[type-var]


async def test_a_run_cancelled_while_it_waits_for_a_slot_does_not_start(
    store: MemoryStore, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started, go, ran = tmp_path / "started", tmp_path / "go", tmp_path / "ran"
    await submit(store, broker, "first", blocking(started, go))
    queued = await submit(store, broker, "second", f"touch {ran}")
    await submit(store, broker, "third", "true")  # handled after the second, in turn
    read = record_reads(store, monkeypatch)
    async with consuming(store, broker, concurrency=1):
        await eventually(started.exists)
        await eventually(lambda: "second" in read)  # read as queued, waiting for the slot
        cancelled = await TaskService(store).cancel("second")
        assert cancelled.status == TaskStatus.CANCELLED
        go.touch()
        assert (await finished(store, "third")).status == TaskStatus.COMPLETED
    assert not broker.queue  # its message was acknowledged, not given back
    assert not ran.exists()
    run = await store.get_run("second", queued.run_id)
    assert run is not None and run.status == RunStatus.CANCELLED and run.started_at is None


async def test_a_command_changed_while_its_run_waits_for_a_slot_runs_as_changed(
    store: MemoryStore, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    await submit(store, broker, "first", blocking(started, go))
    await submit(store, broker, "second", "echo before")
    read = record_reads(store, monkeypatch)
    async with consuming(store, broker, concurrency=1):
        await eventually(started.exists)
        await eventually(lambda: "second" in read)
        await TaskService(store).update("second", TaskUpdate(command="echo after"))
        go.touch()
        task = await finished(store, "second")
    assert task.status == TaskStatus.COMPLETED
    [run] = (await store.list_runs("second", limit=10)).runs
    assert run.output == "after\n"


async def test_a_task_whose_document_cannot_be_read_is_skipped_and_the_rest_runs(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One spoiled before its dispatch is consumed is skipped; one spoiled while its
    command runs keeps its document (its result is not recorded, and said so); neither
    stops the consumer."""
    started = tmp_path / "started"
    await submit(store, broker, "before", "true")
    store._tasks["before"] = b"spoiled"  # pyright: ignore[reportPrivateUsage]
    await submit(store, broker, "during", f"touch {started}; sleep 0.3")

    with caplog.at_level("WARNING"):
        async with consuming(store, broker):
            await eventually(started.exists)
            store._tasks["during"] = b"spoiled"  # pyright: ignore[reportPrivateUsage]
            await eventually(lambda: "result of during/" in caplog.text)
            await submit(store, broker, "after", "true")
            assert (await finished(store, "after")).status == TaskStatus.COMPLETED

    assert store._tasks["before"] == store._tasks["during"] == b"spoiled"  # pyright: ignore[reportPrivateUsage]
    assert "not recorded: task 'during' is stored, but its document cannot be read" in caplog.text

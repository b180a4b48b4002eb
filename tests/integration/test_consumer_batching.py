"""The consumer's batched store calls on the real Redis: a batch that fails in an outage
loses nothing and repeats nothing, whether it never reached Redis or Redis applied it
and the answer was lost."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import pytest

from app.adapters.memory_broker import MemoryBroker
from app.consumer import Consumer
from app.domain import Run, RunStatus, Task, TaskStatus
from app.ports import Store, StoreUnavailable, TaskChange
from app.scheduler import Scheduler
from app.schemas import TaskCreate
from app.service import TaskService
from tests.conftest import eventually

RUNS = 8
BATCH_LATENCY = 0.05
"""Seconds each batched call takes until its outage: runs asking meanwhile queue up."""


def kind_of(change: TaskChange) -> str:
    """Which step of a run a commit records."""
    return "start" if change.runs[0].status == RunStatus.RUNNING else "finish"


ReadAndCommit = Callable[
    [Sequence[tuple[str, str]], Sequence[TaskChange]],
    Awaitable[tuple[list[tuple[Task | None, Run | None]], list[bool]]],
]


class OneOutagePerKind:
    """Fails the first batch holding several reads, the first holding several starts and
    the first holding several finishes (a batch may be all three at once): ``before``
    Redis sees it, or ``after`` Redis applied it."""

    def __init__(self, lost: str) -> None:
        self.lost = lost
        self.failed: dict[str, int] = {}  # kind -> how many of it the failed batch held

    def wrap(self, call: ReadAndCommit) -> ReadAndCommit:
        async def batched(
            pairs: Sequence[tuple[str, str]], changes: Sequence[TaskChange]
        ) -> tuple[list[tuple[Task | None, Run | None]], list[bool]]:
            held = Counter(kind_of(change) for change in changes) + Counter(read=len(pairs))
            if set(held) <= set(self.failed):
                return await call(pairs, changes)
            await anyio.sleep(BATCH_LATENCY)
            failing = {kind: n for kind, n in held.items() if kind not in self.failed and n >= 2}
            if not failing:
                return await call(pairs, changes)
            self.failed.update(failing)
            if self.lost == "after":
                await call(pairs, changes)
            raise StoreUnavailable(f"injected: a batch of {dict(held)}, lost {self.lost}")

        return batched


@pytest.mark.parametrize("lost", ["before", "after"])
async def test_a_batch_failing_in_an_outage_loses_and_repeats_nothing(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lost: str
) -> None:
    ran = tmp_path / "ran"
    broker = MemoryBroker()
    service = TaskService(store)
    queued_revisions: dict[str, int] = {}
    for n in range(RUNS):
        task_id = f"t{n}"
        await service.create(
            TaskCreate(id=task_id, name=task_id, command=f"echo {task_id} >> {ran}")
        )
        await service.execute(task_id)
        task = await store.get_task(task_id)
        assert task is not None
        queued_revisions[task_id] = task.revision
    assert await Scheduler(store, broker, lease_seconds=30).dispatch_due() == RUNS

    outage = OneOutagePerKind(lost)
    monkeypatch.setattr(store, "read_and_commit_each", outage.wrap(store.read_and_commit_each))
    consumer = Consumer(
        store, broker, concurrency=RUNS, output_limit=4096, shutdown_grace=5, lease_seconds=30
    )
    stopping = anyio.Event()

    async def all_recorded() -> bool:
        tasks = [await store.get_task(task_id) for task_id in queued_revisions]
        return all(t is not None and t.status == TaskStatus.COMPLETED for t in tasks)

    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run, stopping)
        await eventually(all_recorded)
        await eventually(lambda: not broker.queue)
        stopping.set()

    assert set(outage.failed) == {"read", "start", "finish"}, outage.failed
    assert all(size >= 2 for size in outage.failed.values()), outage.failed
    assert sorted(ran.read_text().split()) == sorted(queued_revisions), "each ran once"
    for task_id, queued_revision in queued_revisions.items():
        task = await store.get_task(task_id)
        assert task is not None
        # Exactly two commits after the run was queued: its start and its result.
        assert task.revision == queued_revision + 2, task_id
        [run] = (await store.list_runs(task_id, limit=10)).runs
        assert (run.status, run.exit_code) == (RunStatus.COMPLETED, 0)
        assert task.last_run is not None and task.last_run.run_id == run.run_id
    assert not broker.dead_letters

"""A consumer serving several queues: it takes runs from each, each at its own
concurrency, and none from a queue it does not serve (memory store and broker)."""

from __future__ import annotations

from pathlib import Path

import anyio

from app.adapters.memory_broker import MemoryBroker
from app.adapters.memory_store import MemoryStore
from app.consumer import Consumer
from app.domain import TaskStatus
from app.scheduler import Scheduler
from app.schemas import TaskCreate
from app.service import TaskService
from tests.conftest import eventually


async def test_each_queue_runs_at_its_own_concurrency_and_others_wait(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    service = TaskService(store)
    # Each command holds its slot until the gate file exists, counting itself in meanwhile.
    gate = tmp_path / "gate"
    command = f"touch {tmp_path}/$TASK.started; while [ ! -e {gate} ]; do sleep 0.02; done"
    for queue in "abc":
        for number in range(4):
            task_id = f"{queue}{number}"
            await service.create(
                TaskCreate(
                    id=task_id, name=task_id, command=command, env={"TASK": task_id}, queue=queue
                )
            )
            await service.execute(task_id)
    assert await Scheduler(store, broker, lease_seconds=30).dispatch_due() == 12
    consumer = Consumer(
        store,
        broker,
        concurrency=99,
        output_limit=4096,
        shutdown_grace=5,
        lease_seconds=30,
        worker="pool-worker",
        queues={"a": 1, "b": 3},
    )
    stopping = anyio.Event()

    def started(queue: str) -> int:
        return len(list(tmp_path.glob(f"{queue}*.started")))

    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run, stopping)
        await eventually(lambda: started("a") == 1 and started("b") == 3)
        await anyio.sleep(0.3)  # no more start while the slots are taken
        assert (started("a"), started("b"), started("c")) == (1, 3, 0)
        stats = {s.queue: s for s in await broker.queue_stats(["a", "b", "c"])}
        assert (stats["a"].consumers, stats["b"].consumers, stats["c"].consumers) == (1, 1, 0)
        assert stats["c"].depth == 4
        gate.touch()

        async def a_and_b_done() -> bool:
            tasks = [await store.get_task(f"{q}{n}") for q in "ab" for n in range(4)]
            return all(t is not None and t.status == TaskStatus.COMPLETED for t in tasks)

        await eventually(a_and_b_done)
        stopping.set()
    assert started("c") == 0
    waiting = [await store.get_task(f"c{n}") for n in range(4)]
    assert [None if t is None else t.status for t in waiting] == [TaskStatus.PENDING] * 4
    assert await store.queues_in_use() == ["a", "b", "c"]  # named by tasks, or served

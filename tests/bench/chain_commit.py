"""What a chain adds to recording a run's end, on Redis.

Run on demand (needs Redis like the tests):

    .venv/bin/python -m tests.bench.chain_commit [--ends 300]

For chains of 0, 1, 4 and 32 targets it records ``--ends`` run ends the way the roles do
(``transact``: read the task, plan ``finish_run``, commit; with a chain, read each target
and commit everything in one ``commit_chained.lua`` call) and prints the mean time per
end. Between ends each target's queued run is cancelled so that every trigger finds it
idle (a queued run, the dearest case). Keys go under a fresh prefix, deleted afterwards.
"""

from __future__ import annotations

import argparse
import time
import uuid

import anyio

import tests.conftest
from app.adapters import open_store
from app.domain import (
    Chain,
    Outcome,
    Run,
    Task,
    cancel_queued,
    create,
    finish_run,
    queue_run,
    start_run,
    utcnow,
)
from app.ports import Store, TaskChange
from app.transactions import transact
from tests.conftest import delete_keys

OK = Outcome(exit_code=0, duration=0.1, output="", truncated=False)


def new_task(task_id: str, chain: Chain | None = None) -> Task:
    now = utcnow()
    return Task(
        id=task_id, name=task_id, command="true", created_at=now, updated_at=now, chain=chain
    )


async def running(store: Store, task: Task) -> tuple[Task, Run]:
    created = create(task)
    await store.commit(TaskChange.of(created))
    queued = queue_run(created.task, utcnow())
    await store.commit(TaskChange.of(queued))
    started = start_run(queued.task, queued.run, "bench", utcnow(), lease_until=utcnow())
    await store.commit(TaskChange.of(started))
    return started.task, started.run


async def end(store: Store, task: Task, run: Run) -> float:
    """Seconds ``transact`` takes to record ``run`` completed (with its chain)."""
    began = time.perf_counter()
    await transact(store, task.id, lambda current: finish_run(current, run, OK, utcnow()))
    return time.perf_counter() - began


async def idle_again(store: Store, task_id: str) -> None:
    task = await store.get_task(task_id)
    assert task is not None and task.active_run is not None
    run = await store.get_run(task_id, task.active_run.run_id)
    assert run is not None
    await store.commit(TaskChange.of(cancel_queued(task, run, utcnow())))


async def mean_end_ms(targets: int, ends: int) -> float:
    prefix = f"bench-chain-{uuid.uuid4().hex[:8]}:"
    try:
        async with open_store(tests.conftest.REDIS_URL, prefix=prefix) as store:
            ids = [f"target-{k}" for k in range(targets)]
            for target in ids:
                await store.commit(TaskChange.of(create(new_task(target))))
            chain = Chain(on_success=ids) if ids else None
            spent = 0.0
            for n in range(ends):
                task, run = await running(store, new_task(f"source-{n}", chain))
                spent += await end(store, task, run)
                for target in ids:
                    await idle_again(store, target)
            return spent / ends * 1000
    finally:
        await delete_keys(prefix)


async def main() -> None:
    parser = argparse.ArgumentParser(description="What a chain adds to recording a run's end")
    parser.add_argument("--ends", type=int, default=300)
    ends = parser.parse_args().ends
    for targets in (0, 1, 4, 32):
        print(f"{targets:2d} targets: {await mean_end_ms(targets, ends):.2f} ms per end")


if __name__ == "__main__":
    anyio.run(main)

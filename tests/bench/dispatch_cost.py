"""The scheduler's CPU per dispatched task, on its own.

    .venv/bin/python -m tests.bench.dispatch_cost [--tasks 3000] [--rounds 3] [--versus DIR]

Each measurement stores ``--tasks`` tasks due now (bulk creates), then, in a process of
its own, calls ``Scheduler.dispatch_due`` until every one has been claimed, committed,
published with its confirm and released, on the real Redis and RabbitMQ under a unique
prefix (deleted afterwards). It prints that process's CPU per dispatched task
(``time.process_time``: the scheduler's Python, redis-py and aiormq, not the servers')
and the dispatch rate. Dispatch runs in batches of up to 500, as the scheduler's do when
many tasks are due at once.

With ``--versus DIR`` every round measures this checkout and ``DIR`` (another checkout,
e.g. a ``git worktree`` of an older commit, its ``app`` loaded through ``PYTHONPATH``)
one after the other, alternating which goes first, and prints the means and their
ratio. Figures are printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import anyio

# The rest is imported where it is used: run with ``--one``, this file measures another
# checkout, whose ``app`` (and ``tests``) come first on ``PYTHONPATH``.


async def dispatch_all(tasks: int, prefix: str, redis_url: str, amqp_url: str) -> dict[str, float]:
    """Dispatch the ``tasks`` due under ``prefix``: CPU and wall time (the measured
    process, whose ``app`` is the checkout's on ``PYTHONPATH``)."""
    from app.adapters import open_broker, open_store
    from app.scheduler import Scheduler

    async with (
        open_store(redis_url, prefix=prefix, run_history=10) as store,
        open_broker(amqp_url, prefix=prefix) as broker,
    ):
        scheduler = Scheduler(store, broker, lease_seconds=60)
        cpu, wall = time.process_time(), time.perf_counter()
        claimed = 0
        while claimed < tasks:
            claimed += await scheduler.dispatch_due()
        return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


async def measure(source: Path, tasks: int) -> tuple[float, float]:
    """CPU seconds per dispatch of a scheduler from ``source``, and dispatches per second."""
    from app.adapters import open_store
    from tests.bench.deployments import forget
    from tests.bench.versus import store_due_now
    from tests.conftest import AMQP_URL, REDIS_URL

    prefix = f"taskq-dispatch-{uuid.uuid4().hex[:8]}:"
    try:
        async with open_store(REDIS_URL, prefix=prefix, run_history=10) as store:
            await store_due_now(store, tasks)
        command = [sys.executable, __file__, "--one", str(tasks), prefix, REDIS_URL, AMQP_URL]
        env = {**os.environ, "PYTHONPATH": str(source)}
        finished = await anyio.run_process(command, env=env)
    finally:
        await forget(prefix)
    figures = json.loads(finished.stdout.decode().splitlines()[-1])
    return figures["cpu"] / tasks, tasks / figures["wall"]


async def main(tasks: int, rounds: int, versus: Path | None) -> None:
    from tests.bench.versus import alternating, print_means, sides

    where = sides(versus)
    per_task: dict[str, list[float]] = {side: [] for side in where}
    print(f"dispatch cost: {tasks} tasks due at once, {rounds} round(s)")
    for round_number, side in alternating(rounds, list(where)):
        cpu, rate = await measure(where[side], tasks)
        per_task[side].append(cpu)
        print(f"round {round_number}, {side:5}: {cpu * 1e6:.0f} us CPU a task, {rate:,.0f}/s")
    print_means(per_task, where, "a task")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        count, prefix, redis_url, amqp_url = sys.argv[2:6]
        print(json.dumps(anyio.run(dispatch_all, int(count), prefix, redis_url, amqp_url)))
    else:
        parser = argparse.ArgumentParser(description="The scheduler's CPU per dispatched task")
        parser.add_argument("--tasks", type=int, default=3000)
        parser.add_argument("--rounds", type=int, default=3)
        parser.add_argument("--versus", type=Path, metavar="DIR", help="another checkout")
        args = parser.parse_args()
        versus = None if args.versus is None else args.versus.resolve()
        anyio.run(main, args.tasks, args.rounds, versus)

"""The scheduler's CPU per dispatched task, on its own.

    .venv/bin/python -m tests.bench.dispatch_cost [--tasks 3000] [--rounds 3] [--versus DIR]

Each measurement is a process of its own: it stores ``--tasks`` tasks due now (bulk
creates), then calls ``Scheduler.dispatch_due`` until every one has been claimed,
committed, published with its confirm and released, on the real Redis and RabbitMQ
under a unique prefix (deleted afterwards). It prints the process's CPU per dispatched
task (``time.process_time``: the scheduler's Python, redis-py and aiormq, not the
servers') and the dispatch rate. Dispatch runs in batches of up to 500, as the
scheduler's do when many tasks are due at once.

With ``--versus DIR`` every round measures this checkout and ``DIR`` (another checkout,
e.g. a ``git worktree`` of an older commit, its ``app`` loaded through ``PYTHONPATH``)
one after the other, alternating which goes first, and prints the means and their
ratio. Figures are printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anyio

CHECKOUT = Path(__file__).resolve().parents[2]
CREATE_BATCH = 500


async def measure(tasks: int, prefix: str, redis_url: str, amqp_url: str) -> dict[str, float]:
    """Store ``tasks`` due now and dispatch them all; CPU and wall time of the dispatch."""
    from app.adapters import open_broker, open_store
    from app.scheduler import Scheduler
    from app.schemas import TaskCreate
    from app.service import TaskService

    async with (
        open_store(redis_url, prefix=prefix, run_history=10) as store,
        open_broker(amqp_url, prefix=prefix) as broker,
    ):
        service = TaskService(store)
        now = datetime.now(UTC)
        for first in range(0, tasks, CREATE_BATCH):
            await service.create_each(
                [
                    TaskCreate(id=f"t{n:06}", name="dispatch", command="true", scheduled_at=now)
                    for n in range(first, min(tasks, first + CREATE_BATCH))
                ]
            )
        scheduler = Scheduler(store, broker, lease_seconds=60)
        cpu, wall = time.process_time(), time.perf_counter()
        claimed = 0
        while claimed < tasks:
            claimed += await scheduler.dispatch_due()
        return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


def run_one(source: Path, tasks: int) -> dict[str, float]:
    """One measurement in a fresh process serving ``source``'s ``app``."""
    from tests.bench.deployments import forget
    from tests.conftest import AMQP_URL, REDIS_URL

    prefix = f"taskq-dispatch-{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, "PYTHONPATH": str(source)}
    command = [sys.executable, __file__, "--one", str(tasks), prefix, REDIS_URL, AMQP_URL]
    try:
        finished = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    finally:
        anyio.run(forget, prefix)
    return json.loads(finished.stdout.splitlines()[-1])


def describe(figures: dict[str, float], tasks: int) -> str:
    return f"{figures['cpu'] / tasks * 1e6:.0f} us CPU a task, {tasks / figures['wall']:,.0f}/s"


def main() -> None:
    parser = argparse.ArgumentParser(description="The scheduler's CPU per dispatched task")
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--versus", type=Path, metavar="DIR", help="another checkout")
    args = parser.parse_args()
    sides = {"this": CHECKOUT}
    if args.versus is not None:
        sides["other"] = args.versus.resolve()
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    print(f"dispatch cost: {args.tasks} tasks due at once, {args.rounds} round(s)")
    for round_number in range(1, args.rounds + 1):
        order = list(sides) if round_number % 2 else list(reversed(sides))
        for side in order:
            figures = run_one(sides[side], args.tasks)
            cpu[side].append(figures["cpu"] / args.tasks * 1e6)
            print(f"round {round_number}, {side:5}: {describe(figures, args.tasks)}")
    means = {side: statistics.mean(values) for side, values in cpu.items()}
    for side, mean in means.items():
        print(f"  {side:5} mean {mean:.0f} us CPU a task ({sides[side]})")
    if "other" in means:
        print(f"  this / other: {means['this'] / means['other']:.3f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        tasks, prefix, redis_url, amqp_url = sys.argv[2:6]
        result = anyio.run(measure, int(tasks), prefix, redis_url, amqp_url)
        print(json.dumps(result))
    else:
        main()

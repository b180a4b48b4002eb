"""One consumer process's CPU per run, on its own.

    .venv/bin/python -m tests.bench.consumer_cost [--runs 3000] [--concurrency 8] \
        [--rounds 3] [--versus DIR]

Each measurement stores ``--runs`` tasks running ``true``, due now, and dispatches them
all to the queue (in this process, before any consumer runs), then starts
``taskq serve --roles consumer`` with one process and ``--concurrency`` commands at a
time, and waits until every run is recorded completed. It prints the consumer's own CPU
per run (``/proc/PID/stat``; the ``sh`` children it reaped apart) and the runs per
second, on the real Redis and RabbitMQ under a unique prefix (deleted afterwards). The
machine's other work (Redis, RabbitMQ, the commands) has the other core to itself, so
the figure swings far less than ``compare``'s.

With ``--versus DIR`` every round measures this checkout and ``DIR`` (another checkout,
its ``app`` and ``cli`` served through ``PYTHONPATH``) one after the other, alternating
which goes first, and prints the means and their ratio. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

import anyio

from app.adapters import open_broker, open_store
from app.domain import TaskStatus
from app.scheduler import Scheduler
from tests.bench.deployments import forget
from tests.bench.figures import CLOCK_TICKS
from tests.bench.versus import alternating, print_means, sides, store_due_now
from tests.conftest import AMQP_URL, REDIS_URL, eventually
from tests.e2e.harness import running, service_env


def cpu_seconds(pid: int) -> tuple[float, float]:
    """The process's own CPU, and that of the children it reaped, in seconds."""
    fields = [
        int(f) for f in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:15]
    ]
    return (fields[0] + fields[1]) / CLOCK_TICKS, (fields[2] + fields[3]) / CLOCK_TICKS


async def measure(source: Path, runs: int, concurrency: int) -> tuple[float, float, float]:
    """CPU seconds per run of a consumer serving ``source`` (its own, then its commands'),
    and runs per second."""
    prefix = f"taskq-consumer-{uuid.uuid4().hex[:8]}:"
    try:
        async with (
            open_store(REDIS_URL, prefix=prefix, run_history=10) as store,
            open_broker(AMQP_URL, prefix=prefix) as broker,
        ):
            await store_due_now(store, runs)
            scheduler = Scheduler(store, broker, lease_seconds=120)
            dispatched = 0
            while dispatched < runs:
                dispatched += await scheduler.dispatch_due()

            async def all_completed() -> bool:
                done = await store.list_tasks(status=TaskStatus.COMPLETED, limit=runs, after=None)
                return len(done.tasks) >= runs

            env = service_env(
                prefix,
                TASKQ_CONCURRENCY=str(concurrency),
                TASKQ_PROCESSES="1",
                PYTHONPATH=str(source),
            )
            async with running(["serve", "--roles", "consumer"], env) as consumer:
                pid = consumer.process.pid
                (own, children), wall = cpu_seconds(pid), time.perf_counter()
                await eventually(all_completed, within=600, every=0.2)
                own_after, children_after = cpu_seconds(pid)
                wall = time.perf_counter() - wall
    finally:
        await forget(prefix)
    return (own_after - own) / runs, (children_after - children) / runs, runs / wall


async def main(runs: int, concurrency: int, rounds: int, versus: Path | None) -> None:
    where = sides(versus)
    per_run: dict[str, list[float]] = {side: [] for side in where}
    print(f"consumer cost: {runs} runs of `true`, one consumer process x {concurrency}")
    for round_number, side in alternating(rounds, list(where)):
        own, commands, rate = await measure(where[side], runs, concurrency)
        per_run[side].append(own)
        print(
            f"round {round_number}, {side:5}: {own * 1e6:.0f} us CPU a run "
            f"(its commands {commands * 1e6:.0f} us more), {rate:,.0f} runs/s"
        )
    print_means(per_run, where, "a run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="One consumer process's CPU per run")
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--versus", type=Path, metavar="DIR", help="another checkout")
    args = parser.parse_args()
    versus = None if args.versus is None else args.versus.resolve()
    anyio.run(main, args.runs, args.concurrency, args.rounds, versus)

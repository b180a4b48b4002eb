"""End-to-end throughput and scheduling lateness of ``taskq serve`` on this machine.

Run on demand (needs Redis and RabbitMQ, like the tests):

    .venv/bin/python -m tests.bench.throughput [--tasks 2000] [--consumers 1]
    .venv/bin/python -m tests.bench.throughput --serve-processes 2   # one `taskq serve`

It prints, measured in the same run:
- baseline: how fast this machine spawns `true` through AnyIO's process API from one
  process at the same concurrency (the ceiling for any Python worker here), before the
  run and again after it, since the machine's speed swings within minutes; the
  throughput's ratio is to their mean (and, as a range, to each);
- throughput: N `true` tasks all due at one instant, from that instant until the last
  run finished, through the real processes, Redis and RabbitMQ;
- lateness: tasks due one at a time (50 ms apart) on an otherwise idle system,
  started_at minus scheduled_at, p50 / p99 / max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import redis.asyncio as redis

from app.adapters.amqp_broker import delete_amqp_layout
from tests.conftest import AMQP_URL, REDIS_URL, delete_keys, eventually
from tests.e2e.harness import ServiceProcess, running, service_env
from tests.processes import children

CREATE_CONCURRENCY = 32


async def spawn_baseline(count: int, concurrency: int) -> float:
    """`true` spawns per second from one process with ``concurrency`` at once."""
    limiter = anyio.Semaphore(concurrency)

    async def one() -> None:
        async with limiter:
            await anyio.run_process(["sh", "-c", "true"])

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return count / (time.perf_counter() - started)


async def create_all(http: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> None:
    limiter = anyio.Semaphore(CREATE_CONCURRENCY)

    async def create(body: dict[str, Any]) -> None:
        async with limiter:
            response = await http.post("/tasks", json=body)
            response.raise_for_status()

    async with anyio.create_task_group() as tg:
        for body in bodies:
            tg.start_soon(create, body)


async def runs_of(http: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    limiter = anyio.Semaphore(CREATE_CONCURRENCY)

    async def fetch(task_id: str) -> None:
        async with limiter:
            runs.extend((await http.get(f"/tasks/{task_id}/runs")).json())

    async with anyio.create_task_group() as tg:
        for task_id in ids:
            tg.start_soon(fetch, task_id)
    return runs


async def wait_completed(store: redis.Redis, prefix: str, count: int, within: float) -> None:
    """Wait until ``count`` tasks are completed, asking Redis (cheap) rather than the API
    (which would compete with the scheduler for the CPU)."""

    async def done() -> bool:
        return await store.zcard(f"{prefix}status:completed") >= count

    await eventually(done, within=within, every=0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def server_pids() -> dict[str, int]:
    """Redis and RabbitMQ, found by their process names."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as comm:
                    name = comm.read().strip()
            except OSError:
                continue
            if name in ("redis-server", "beam.smp"):
                found.setdefault(name, int(entry))
    return found


def parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


async def main(tasks: int, consumers: int, concurrency: int, serve_processes: int) -> None:
    """``serve_processes``: one ``taskq serve --processes N`` (every role) rather than
    ``--roles api,scheduler`` and ``consumers`` consumer-only processes."""
    prefix = f"taskq-bench-{uuid.uuid4().hex[:8]}:"
    env = service_env(prefix, TASKQ_CONCURRENCY=str(concurrency))
    consumers = serve_processes or consumers
    at_once = concurrency * consumers
    baseline_before = await spawn_baseline(min(tasks, 2000), at_once)

    store = redis.Redis.from_url(REDIS_URL)
    async with AsyncExitStack() as stack:
        if serve_processes:
            serve = ["serve", "--processes", str(serve_processes)]
            api = await stack.enter_async_context(running(serve, env, name="api+scheduler"))
            consumer_pids = {
                f"consumer-{n}": pid for n, pid in enumerate(children(api.process.pid))
            }
        else:
            api = await stack.enter_async_context(
                running(["serve", "--roles", "api,scheduler"], env, name="api+scheduler")
            )
            consumers_running: list[ServiceProcess] = [
                await stack.enter_async_context(
                    running(["serve", "--roles", "consumer"], env, name=f"consumer-{n}")
                )
                for n in range(consumers)
            ]
            consumer_pids = {c.name: c.process.pid for c in consumers_running}
        assert api.api_url is not None
        async with httpx.AsyncClient(base_url=api.api_url, timeout=60) as http:
            # Throughput: everything due at one instant, created well before it.
            due = datetime.now(UTC) + timedelta(seconds=3 + tasks / 250)
            ids = [f"bulk-{n:06}" for n in range(tasks)]
            created = time.perf_counter()
            await create_all(
                http,
                [
                    {"id": i, "name": i, "command": "true", "scheduled_at": due.isoformat()}
                    for i in ids
                ],
            )
            create_rate = tasks / (time.perf_counter() - created)
            assert datetime.now(UTC) < due, "creating took longer than planned; lower --tasks"
            pids = {"api+scheduler": api.process.pid, **server_pids()}
            pids |= consumer_pids
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            await wait_completed(store, prefix, tasks, within=120 + tasks / 50)
            cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            runs = await runs_of(http, ids)
            assert len(runs) == tasks
            last = max(parse(r["finished_at"]) for r in runs)
            elapsed = (last - due).total_seconds()
            rate = tasks / elapsed
            # Measured again once the run is over (taskq idle): the machine's speed swings
            # within minutes, and the ratio is to the mean of the two.
            baseline_after = await spawn_baseline(min(tasks, 2000), at_once)
            baseline = (baseline_before + baseline_after) / 2
            print(
                f"baseline: {baseline_before:,.0f} `true` spawns/s from one process "
                f"({at_once} at once) before the run, {baseline_after:,.0f} after it, "
                f"mean {baseline:,.0f}"
            )
            print(f"created {tasks} tasks over HTTP at {create_rate:,.0f}/s")
            print(
                f"throughput: {tasks} `true` tasks due at once ran in {elapsed:.2f} s = "
                f"{rate:,.0f} tasks/s ({rate / baseline:.2f} x the spawn baseline's mean, "
                f"{rate / max(baseline_before, baseline_after):.2f}"
                f"-{rate / min(baseline_before, baseline_after):.2f} x each), "
                f"{consumers} consumer process(es) x {concurrency}"
                + (" under one `taskq serve`" if serve_processes else "")
            )
            print(
                "CPU per task while they ran (ms): "
                + ", ".join(f"{name} {1000 * used / tasks:.2f}" for name, used in cpu.items())
                + " (children's CPU is counted once reaped)"
            )

            # Lateness: one task due every 50 ms on an idle system.
            first = datetime.now(UTC) + timedelta(seconds=1)
            sparse = [f"sparse-{n:03}" for n in range(50)]
            await create_all(
                http,
                [
                    {
                        "id": i,
                        "name": i,
                        "command": "true",
                        "scheduled_at": (first + timedelta(milliseconds=50 * n)).isoformat(),
                    }
                    for n, i in enumerate(sparse)
                ],
            )
            await wait_completed(store, prefix, tasks + len(sparse), within=30)
            sparse_runs = await runs_of(http, sparse)
            lateness = sorted(
                (
                    parse(r["started_at"])
                    - (first + timedelta(milliseconds=50 * int(r["task_id"].split("-")[1])))
                ).total_seconds()
                * 1000
                for r in sparse_runs
            )
            p99 = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))]
            print(
                f"lateness (started_at - scheduled_at, {len(lateness)} tasks 50 ms apart): "
                f"min {lateness[0]:.1f} ms, p50 {statistics.median(lateness):.1f} ms, "
                f"p99 {p99:.1f} ms, max {lateness[-1]:.1f} ms"
            )
            assert lateness[0] >= 0, "a task started before its scheduled time"

    await store.aclose()
    await delete_keys(prefix)
    await delete_amqp_layout(AMQP_URL, prefix=prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="End-to-end throughput and lateness")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--serve-processes", type=int, default=0)
    options = parser.parse_args()
    anyio.run(main, options.tasks, options.consumers, options.concurrency, options.serve_processes)

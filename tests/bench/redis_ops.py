"""What one task costs Redis, and where one Redis (one shard) stops being enough.

Run on demand (needs RabbitMQ like the tests; Redis is a throwaway server of its own, so
that nothing else's commands are counted):

    .venv/bin/python -m tests.bench.redis_ops [--tasks 500] [--aof | --cluster]

It runs N ``true`` tasks through the real pipeline (created over HTTP, all due at one
instant, claimed by the scheduler, dispatched through RabbitMQ, run by a consumer, their
runs recorded) on one ``taskq serve`` process, and reads Redis' own counters before and
after (``INFO commandstats``, ``INFO stats``, ``INFO cpu``):

- commands per task (``total_commands_processed``, which counts the commands run inside
  a script as well as the script call) and, from ``commandstats``, per command;
- Redis CPU per task (user + system of the server process), hence tasks/s per core of
  Redis when the server is the bottleneck;
- against ``redis-benchmark`` on the same server: the CPU one plain GET/SET costs at
  saturation and the requests/s one core serves, so the task's cost reads as "GET
  equivalents".

The whole store of one key prefix lives in one hash slot (also on a Redis Cluster:
``{taskq}:``), so these figures are the ceiling of one taskq deployment whatever the
cluster's size: a cluster spreads several prefixes (tenants), not one.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import redis.asyncio as redis

from app.adapters.amqp_broker import delete_amqp_layout
from app.adapters.redis_cluster import cluster_prefix
from tests.bench.throughput import create_all, wait_completed
from tests.conftest import AMQP_URL
from tests.e2e.harness import running, service_env
from tests.e2e.redis_cluster_servers import throwaway_redis_cluster
from tests.e2e.servers import throwaway_redis

BENCHMARK_REQUESTS = 200_000
IDLE_SECONDS = 3.0


async def counters(client: redis.Redis) -> dict[str, float]:
    """Redis' CPU seconds, client commands, and per command calls (``calls:NAME``)."""
    info: dict[str, Any] = await client.info("all")  # pyright: ignore[reportUnknownMemberType]
    found = {
        "cpu": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "commands": float(info["total_commands_processed"]),
    }
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            stats: dict[str, Any] = value
            found[f"calls:{key.removeprefix('cmdstat_')}"] = float(stats["calls"])
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


async def through_the_pipeline(
    url: str, tasks: int, *, prefix: str, store_prefix: str, watched: int, others: list[int]
) -> tuple[dict[str, float], float]:
    """Counter deltas of the server on port ``watched`` over ``tasks`` tasks run end to
    end (``others_cpu``: the CPU of the servers on ``others`` meanwhile, the rest of a
    cluster), and the seconds they took. ``store_prefix``: the prefix of the keys."""
    env = service_env(prefix, REDIS_URL=url, TASKQ_CONCURRENCY="8")
    client = redis.Redis(port=watched)
    rest = [redis.Redis(port=port) for port in others]

    async def sample() -> dict[str, float]:
        found = await counters(client)
        found["others_cpu"] = sum([(await counters(other))["cpu"] for other in rest])
        return found

    try:
        async with running(["serve"], env, name="taskq") as service:
            assert service.api_url is not None
            async with httpx.AsyncClient(base_url=service.api_url, timeout=60) as http:
                await anyio.sleep(1)  # started: its first reads are not the tasks' cost
                idle_before = await sample()
                await anyio.sleep(IDLE_SECONDS)
                before = await sample()
                idle = delta(before, idle_before)
                began = time.perf_counter()
                due = datetime.now(UTC) + timedelta(seconds=2 + tasks / 200)
                ids = [f"ops-{n:06}" for n in range(tasks)]
                await create_all(
                    http,
                    [
                        {"id": i, "name": i, "command": "true", "scheduled_at": due.isoformat()}
                        for i in ids
                    ],
                )
                await wait_completed(client, store_prefix, tasks, within=120 + tasks / 20)
                took = time.perf_counter() - began
                after = await sample()
    finally:
        for each in (client, *rest):
            await each.aclose()
        await delete_amqp_layout(AMQP_URL, prefix=prefix)
    used = delta(after, before)
    # What an idle taskq costs meanwhile (waits, heartbeats, probes) is not the tasks' cost.
    share = took / IDLE_SECONDS
    return {key: value - idle.get(key, 0.0) * share for key, value in used.items()}, took


async def benchmark(port: int, test: str) -> tuple[float, float]:
    """``redis-benchmark -t test`` on the server: requests/s, and Redis CPU microseconds
    per request meanwhile."""
    client = redis.Redis(port=port)
    try:
        before = await counters(client)
        command = [
            shutil.which("redis-benchmark") or "redis-benchmark",
            "-p", str(port), "-q", "-t", test, "-n", str(BENCHMARK_REQUESTS), "-c", "50",
        ]  # fmt: skip
        result = await anyio.run_process(command)
        after = await counters(client)
    finally:
        await client.aclose()
    text = result.stdout.decode()
    rate = float(re.findall(r"([\d.]+) requests per second", text)[-1])
    used = delta(after, before)
    return rate, 1e6 * used["cpu"] / used["commands"]


async def main(tasks: int, aof: bool, cluster: bool) -> None:
    base = Path(tempfile.mkdtemp(prefix="taskq-bench-redis-ops-"))
    prefix = f"taskq-bench-{uuid.uuid4().hex[:8]}:"
    try:
        if cluster:
            async with throwaway_redis_cluster(base) as nodes:
                tagged = cluster_prefix(prefix)
                master = await nodes.owner_of(f"{tagged}tasks")
                others = [node.port for node in nodes.nodes if node is not master]
                used, took = await through_the_pipeline(
                    nodes.url,
                    tasks,
                    prefix=prefix,
                    store_prefix=tagged,
                    watched=master.port,
                    others=others,
                )
            report(used, took, tasks, "Cluster, 3 masters + 3 replicas: the slot's master")
            print(f"the other five nodes' CPU per task: {1e6 * used['others_cpu'] / tasks:.0f} us")
            return
        async with throwaway_redis(base, appendonly=aof) as server:
            used, took = await through_the_pipeline(
                server.url,
                tasks,
                prefix=prefix,
                store_prefix=prefix,
                watched=server.port,
                others=[],
            )
            gets, get_cpu = await benchmark(server.port, "get")
            sets, set_cpu = await benchmark(server.port, "set")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    cpu_us = report(used, took, tasks, "AOF appendfsync always" if aof else "without persistence")
    print(
        f"redis-benchmark (50 clients, {BENCHMARK_REQUESTS:,} requests): "
        f"GET {gets:,.0f}/s at {get_cpu:.1f} us of Redis CPU each, "
        f"SET {sets:,.0f}/s at {set_cpu:.1f} us"
    )
    print(
        f"one task costs Redis as much CPU as {cpu_us / get_cpu:.0f} GETs: one Redis core "
        f"serves at most ~{1e6 / cpu_us:,.0f} tasks/s "
        f"(~{1e6 / get_cpu:,.0f} GETs/s per core by the same measure)"
    )


def report(used: dict[str, float], took: float, tasks: int, kind: str) -> float:
    """Print what the tasks cost Redis; its CPU microseconds per task."""
    cpu_us = 1e6 * used["cpu"] / tasks
    calls = {key.removeprefix("calls:"): n for key, n in used.items() if key.startswith("calls:")}
    scripts = sum(n for name, n in calls.items() if name in ("evalsha", "eval"))
    top = sorted(calls.items(), key=lambda item: -item[1])[:12]
    print(f"{tasks} `true` tasks end to end in {took:.1f} s on one `taskq serve` (Redis {kind})")
    print(
        f"per task: {used['commands'] / tasks:.1f} commands ({scripts / tasks:.1f} script "
        f"calls, counted with the commands run inside them); Redis CPU {cpu_us:.0f} us "
        f"(an idle taskq's share over the same {took:.1f} s taken out)"
    )
    print("calls per task: " + ", ".join(f"{name} {n / tasks:.2f}" for name, n in top if n))
    return cpu_us


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Redis commands and CPU per task")
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--aof", action="store_true", help="Redis with appendfsync always")
    parser.add_argument("--cluster", action="store_true", help="on a Redis Cluster of 6 nodes")
    options = parser.parse_args()
    anyio.run(main, options.tasks, options.aof, options.cluster)

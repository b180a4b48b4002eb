"""What compare's workload costs at the least on this machine, part by part, against the
CPU Celery spends on a whole task, in one run: how far taskq could go by trimming.

    .venv/bin/python -m tests.bench.floor [-n 3000] [--skip-celery]

``../shared/peers/compare`` asks taskq, for each task, for one HTTP request (Hypercorn and
Litestar, an aiohttp client), one persistent message through a quorum queue with
publisher confirms, the task's state in Redis (created, queued, read by the worker,
started, finished) and one command spawned and reaped. Each part is measured here alone,
done as cheaply as the stack allows and doing nothing else, so the sum is a floor: what
taskq's own logic (validation, the domain, its scheduler and consumer loops) costs comes
on top of it.

- http: ``POST`` of a task's body to a handler that returns a constant without reading it
  (``trivial_route_server.py``: taskq's own server, middleware and start-up), 32 in
  flight from aiohttp in this process: the client's CPU and the server's, per request;
- broker: messages published persistent and ``mandatory`` with confirms (up to 100
  awaiting their confirm) to a quorum queue of its own, consumed meanwhile (prefetch 24)
  and acked one by one: this process (both clients) and RabbitMQ, per message;
- store: five calls a task, four writes (an ``EVALSHA`` setting a 500-byte document and
  its index entry: created, queued, started, finished) and one ``GET`` (the worker's
  read), each call sent with those of 7 other tasks in one pipeline (as batched as
  taskq's busiest path gets): this process and Redis, per task;
- commands: ``sh -c true`` through taskq's ``run_command`` (``posix_spawn``, a pidfd),
  8 at once: the spawning process and the commands, per command;

then Celery on compare's workload (``tests.bench.cpu_budget``'s Celery side, prefork with
8 processes): every process's CPU per task. It prints each part, the floor, Celery's
total, and Celery's total / the floor: the throughput over Celery's that this machine's
cores would allow taskq if its own logic cost nothing (``compare``'s goal is 1.5x). Every
part runs on the real servers under a unique prefix and queue, removed afterwards.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import aiormq
import anyio
import redis.asyncio as redis
from aiormq.abc import DeliveredMessage

from app.supervisor import _watch_children_with_pidfd  # pyright: ignore[reportPrivateUsage]
from tests.bench.api_create import SERVER
from tests.bench.cpu_budget import celery_budget, cores
from tests.bench.deployments import IN_FLIGHT, bench_env, forget
from tests.bench.figures import CLOCK_TICKS, cpu_ticks, named
from tests.bench.spawn_rate import cpu_seconds, run_true
from tests.bench.trivial_route_server import TRIVIAL_PATH
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.harness import running

PUBLISH_WINDOW = 100
PREFETCH = 24
PIPELINE = 8
COMMANDS_AT_ONCE = 8
DOCUMENT = "x" * 500
WRITE = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class Part:
    """One part of the work: where its CPU went, in ms per task."""

    name: str
    cpu_ms: dict[str, float]
    rate: float
    """Tasks (requests, messages, commands) a second while it was measured."""

    @property
    def total_ms(self) -> float:
        return sum(self.cpu_ms.values())


def reaped_cpu() -> float:
    """The CPU of the children this process has waited for, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def servers_cpu(name: str) -> float:
    """CPU so far of every process named ``name`` (RabbitMQ's ``beam.smp``,
    ``redis-server``), in seconds."""
    ticks = 0
    for pid in named(name):
        seen = cpu_ticks(pid)
        ticks += seen.own if seen else 0
    return ticks / CLOCK_TICKS


async def measured(
    name: str, count: int, work: Callable[[], Awaitable[None]], **others: Callable[[], float]
) -> Part:
    """``work`` timed, with this process's CPU and each of ``others`` (a CPU counter in
    seconds, e.g. a server's) over it, per task of ``count``."""
    before = {"this process": cpu_seconds(), **{key: read() for key, read in others.items()}}
    started = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - started
    after = {"this process": cpu_seconds(), **{key: read() for key, read in others.items()}}
    cpu = {key: 1000 * (after[key] - before[key]) / count for key in before}
    return Part(name, cpu, count / elapsed)


async def http_part(count: int) -> Part:
    """``POST`` of a task's body to a handler that does nothing, on taskq's server."""
    prefix = f"taskq-floor-{uuid.uuid4().hex[:8]}:"
    body = {"name": "bench", "command": "true"}
    try:
        async with (
            running(
                ["serve", "--roles", "api"],
                bench_env(prefix),
                name="api",
                command=[sys.executable, str(SERVER)],
            ) as api,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT)) as session,
        ):
            assert api.api_url is not None
            url = api.api_url + TRIVIAL_PATH
            limit = anyio.Semaphore(IN_FLIGHT)

            async def post() -> None:
                async with limit, session.post(url, json=body) as answer:
                    await answer.read()
                    if answer.status != 201:
                        raise SystemExit(f"the trivial route answered {answer.status}")

            async def posts(number: int) -> None:
                async with anyio.create_task_group() as tg:
                    for _ in range(number):
                        tg.start_soon(post)

            await posts(200)  # warm up: connections, the server's first requests
            pid = api.process.pid

            def server() -> float:
                seen = cpu_ticks(pid)
                assert seen is not None
                return seen.own / CLOCK_TICKS

            return await measured("http", count, lambda: posts(count), server=server)
    finally:
        await forget(prefix)


async def broker_part(count: int, window: int) -> Part:
    """Persistent messages through a quorum queue with confirms, consumed and acked;
    ``window`` of them awaiting their confirm at most."""
    queue = f"taskq-floor-{uuid.uuid4().hex[:8]}"
    body = b'{"task_id":"0123456789abcdef","run_id":"0123456789abcdef","attempt":1}'
    properties = aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/json")
    publishing = await aiormq.connect(AMQP_URL)
    consuming = await aiormq.connect(AMQP_URL)
    try:
        publisher = await publishing.channel(publisher_confirms=True)
        await publisher.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        consumer = await consuming.channel()
        await consumer.basic_qos(prefetch_count=PREFETCH)

        async def through(number: int) -> None:
            received = 0
            all_received = anyio.Event()

            async def on_message(message: DeliveredMessage) -> None:
                nonlocal received
                assert message.delivery_tag is not None
                await consumer.basic_ack(message.delivery_tag)
                received += 1
                if received == number:
                    all_received.set()

            consumed = await consumer.basic_consume(queue, on_message)
            window_left = anyio.Semaphore(window)

            async def publish() -> None:
                async with window_left:
                    confirmation = await publisher.basic_publish(
                        body, routing_key=queue, properties=properties, mandatory=True
                    )
                    if not isinstance(confirmation, aiormq.spec.Basic.Ack):
                        raise SystemExit(f"RabbitMQ did not take a message: {confirmation}")

            async with anyio.create_task_group() as tg:
                for _ in range(number):
                    tg.start_soon(publish)
            await all_received.wait()
            assert consumed.consumer_tag is not None
            await consumer.basic_cancel(consumed.consumer_tag)

        await through(200)  # warm up
        return await measured(
            "broker" if window > 1 else "broker, 1 at a time",
            count,
            lambda: through(count),
            rabbitmq=lambda: servers_cpu("beam.smp"),
        )
    finally:
        channel = await publishing.channel()
        await channel.queue_delete(queue)
        await publishing.close()
        await consuming.close()


async def store_part(count: int) -> Part:
    """Five calls a task (four script writes and a read), eight tasks to a pipeline."""
    prefix = f"taskq-floor-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        write = client.register_script(WRITE)
        index = f"{prefix}index"

        async def stage(ids: list[str], read: bool) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    key = f"{prefix}task:{task_id}"
                    if read:
                        pipe.get(key)
                    else:
                        await write(
                            keys=[key, index], args=[DOCUMENT, time.time(), task_id], client=pipe
                        )
                await pipe.execute()

        async def tasks(number: int) -> None:
            for first in range(0, number, PIPELINE):
                ids = [str(n) for n in range(first, min(first + PIPELINE, number))]
                for read in (False, False, True, False, False):
                    await stage(ids, read)

        await tasks(200)  # warm up: the connection, the script's SHA
        return await measured(
            "store", count, lambda: tasks(count), redis=lambda: servers_cpu("redis-server")
        )
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def commands_part(count: int) -> Part:
    """``sh -c true`` through taskq's own ``run_command``, eight at once."""
    _watch_children_with_pidfd()
    await run_true(100, COMMANDS_AT_ONCE)  # warm up
    return await measured(
        "commands", count, lambda: run_true(count, COMMANDS_AT_ONCE), commands=reaped_cpu
    )


def report(
    parts: list[Part], aside: list[Part], celery_total: float | None, celery_rate: float | None
) -> None:
    """The parts, the floor they add up to, and (with Celery's figures) the ratio."""
    floor = sum(part.total_ms for part in parts)
    print(f"{'part':<24} {'ms/task':>8}  {'rate/s':>8}  where")
    for part in [*parts, *aside]:
        where = ", ".join(f"{key} {value:.3f}" for key, value in part.cpu_ms.items())
        name = part.name if part in parts else f"({part.name})"
        print(f"{name:<24} {part.total_ms:8.3f}  {part.rate:8.0f}  {where}")
    ceiling = cores() * 1000 / floor
    print(
        f"{'floor':<24} {floor:8.3f}  CPU ceiling {cores()} x 1000 / {floor:.2f} = {ceiling:.0f}/s"
    )
    if celery_total is None or celery_rate is None:
        return
    print(
        f"{'celery, a whole task':<24} {celery_total:8.3f}  {celery_rate:8.0f}  "
        f"(compare's workload; its CPU ceiling {cores() * 1000 / celery_total:.0f}/s)"
    )
    print(
        f"celery / floor: {celery_total / floor:.2f}x, the most throughput over Celery these "
        f"cores allow taskq if its own logic cost nothing; the goal, 1.5x, leaves "
        f"{celery_total / 1.5 - floor:.2f} ms a task for that logic"
    )


async def main(count: int, skip_celery: bool) -> None:
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"floor: {count} of each part; {cores()} cores; load average {load}", flush=True)
    parts = [
        await http_part(count),
        await broker_part(count, PUBLISH_WINDOW),
        await store_part(count),
        await commands_part(count),
    ]
    aside = [await broker_part(count, 1)]
    celery_total = celery_rate = None
    if not skip_celery:
        celery = await celery_budget(count)
        celery_total, celery_rate = celery.total_ms, celery.throughput
    report(parts, aside, celery_total, celery_rate)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="What compare's workload costs at the least, part by part"
    )
    parser.add_argument("-n", "--tasks", type=int, default=3000)
    parser.add_argument("--skip-celery", action="store_true")
    arguments = parser.parse_args()
    anyio.run(main, arguments.tasks, arguments.skip_celery)

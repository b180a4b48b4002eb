"""What RabbitMQ and its clients spend a message when a consumer's acks go out as asked
for, against acks that wait a few milliseconds to go out together, in one run.

    .venv/bin/python -m tests.bench.ack_linger [-n 2000] [--rounds 2] [--linger 0.005 0.02]

The traffic has the shape of compare's throughput phase: messages published persistent
and ``mandatory`` with confirms to a quorum queue (with a delivery limit, as taskq's), in
bursts of 500 at about 350 a second, and a consumer with a prefetch of 24 and 8 run slots
that takes a message, acks it 1-3 ms later (the start commit), then holds the slot 10-30
ms (the command). Acks are written either at once, one frame each, or after a linger, the
acks asked for meanwhile as one ``basic_ack(multiple=True)``. This isolates what the
consumer's acks cost RabbitMQ, which ``tests.bench.cpu_budget`` sees only within the
noise of a whole run.

For each way it prints RabbitMQ's CPU (``beam.smp``) and this process's (publisher and
consumer) per message, and the ratio of each to acks written at once. Rounds alternate
the order. Every queue is its own, deleted afterwards. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid

import aiormq
import anyio
from aiormq.abc import DeliveredMessage

from tests.bench.floor import servers_cpu
from tests.bench.spawn_rate import cpu_seconds
from tests.conftest import AMQP_URL

PREFETCH = 24
SLOTS = 8
BURST = 500
RATE = 350.0
PUBLISH_WINDOW = 100


async def measure(count: int, linger: float) -> tuple[float, float]:
    """RabbitMQ's and this process's CPU a message, in ms, acks lingering ``linger``
    seconds (0: each written at once)."""
    queue = f"taskq-ack-linger-{uuid.uuid4().hex[:8]}"
    publishing = await aiormq.connect(AMQP_URL)
    consuming = await aiormq.connect(AMQP_URL)
    try:
        publisher = await publishing.channel(publisher_confirms=True)
        await publisher.queue_declare(
            queue, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 5}
        )
        consumer = await consuming.channel()
        await consumer.basic_qos(prefetch_count=PREFETCH)
        properties = aiormq.spec.Basic.Properties(delivery_mode=2)
        send, receive = anyio.create_memory_object_stream[DeliveredMessage](PREFETCH)
        finished = 0
        all_finished = anyio.Event()
        wanted: list[int] = []
        acked = 0  # the newest tag a multiple ack covered
        enough = anyio.Event()

        async def on_message(message: DeliveredMessage) -> None:
            await send.send(message)

        async def slot() -> None:
            nonlocal finished
            async for message in receive:
                tag = message.delivery_tag
                assert tag is not None
                await anyio.sleep(random.uniform(0.001, 0.003))
                if not linger:
                    await consumer.basic_ack(tag, wait=False)
                elif tag > acked:
                    wanted.append(tag)
                    if len(wanted) >= PREFETCH // 2:
                        enough.set()
                await anyio.sleep(random.uniform(0.01, 0.03))
                finished += 1
                if finished == count:
                    all_finished.set()

        async def write_acks() -> None:
            nonlocal acked, enough
            while True:
                with anyio.move_on_after(linger):
                    await enough.wait()
                enough = anyio.Event()
                if wanted and max(wanted) > acked:
                    acked = max(wanted)
                    # Every tag up to it was delivered and is acked or about to be: a
                    # simplification taskq's own coalescing does not make.
                    await consumer.basic_ack(acked, multiple=True, wait=False)
                wanted.clear()

        window = anyio.Semaphore(PUBLISH_WINDOW)

        async def publish() -> None:
            async with window:
                await publisher.basic_publish(
                    b'{"task_id":"t","run_id":"r","attempt":1}',
                    routing_key=queue,
                    properties=properties,
                    mandatory=True,
                )

        rabbitmq, this = servers_cpu("beam.smp"), cpu_seconds()
        async with anyio.create_task_group() as tg:
            for _ in range(SLOTS):
                tg.start_soon(slot)
            if linger:
                tg.start_soon(write_acks)
            await consumer.basic_consume(queue, on_message)
            for n in range(count):
                tg.start_soon(publish)
                if n % BURST == BURST - 1:
                    await anyio.sleep(BURST / RATE)
            await all_finished.wait()
            tg.cancel_scope.cancel()
        rabbitmq, this = servers_cpu("beam.smp") - rabbitmq, cpu_seconds() - this
        return 1000 * rabbitmq / count, 1000 * this / count
    finally:
        channel = await publishing.channel()
        await channel.queue_delete(queue)
        await publishing.close()
        await consuming.close()


async def main(count: int, rounds: int, lingers: list[float]) -> None:
    ways = [0.0, *lingers]
    figures: dict[float, list[tuple[float, float]]] = {way: [] for way in ways}
    print(f"ack linger: {count} messages a measurement, {rounds} rounds", flush=True)
    for round_ in range(rounds):
        for way in ways if round_ % 2 == 0 else reversed(ways):
            started = time.perf_counter()
            figures[way].append(await measure(count, way))
            rabbitmq, this = figures[way][-1]
            print(
                f"  round {round_ + 1}, {_name(way)}: RabbitMQ {rabbitmq:.3f} ms, this process "
                f"{this:.3f} ms a message ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    base_rabbitmq = statistics.mean(f[0] for f in figures[0.0])
    base_this = statistics.mean(f[1] for f in figures[0.0])
    for way in ways:
        rabbitmq = statistics.mean(f[0] for f in figures[way])
        this = statistics.mean(f[1] for f in figures[way])
        print(
            f"{_name(way):<24} RabbitMQ {rabbitmq:.3f} ms ({rabbitmq / base_rabbitmq:.2f}x), "
            f"this process {this:.3f} ms ({this / base_this:.2f}x) a message"
        )


def _name(linger: float) -> str:
    return "acks at once" if not linger else f"acks lingering {1000 * linger:g} ms"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="What a consumer's acks cost RabbitMQ, written at once or lingering"
    )
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--linger", type=float, nargs="+", default=[0.005, 0.02])
    arguments = parser.parse_args()
    anyio.run(main, arguments.messages, arguments.rounds, arguments.linger)

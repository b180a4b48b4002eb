"""The ``Broker`` contract for worker pools: each taskq queue is a queue of its own.

Every adapter runs the same cases (memory on asyncio and trio, AMQP against the real
RabbitMQ under a per-test prefix, its extra queues deleted afterwards). RabbitMQ's names
are checked from the outside at the end.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiormq
import anyio
import msgspec
import pytest

from app.adapters.amqp_broker import (
    ROUTING_KEY,
    AmqpBroker,
    AmqpLayout,
    delete_amqp_layout,
    open_amqp_broker,
)
from app.adapters.memory_broker import MemoryBroker
from app.ports import DEFAULT_QUEUE, Broker, Dispatch, QueueStats
from tests.conftest import AMQP_URL, anyio_param, eventually
from tests.contract.test_broker_contract import (
    CASES,
    WAIT,
    amqp_channel,
    assert_nothing_arrives,
    receive,
)

QUEUES = ("a", "b", "build.x-1_y")


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str | tuple[str, dict[str, Any]]:
    return anyio_param(case[1])


@pytest.fixture
async def broker(case: tuple[str, str], prefix: str) -> AsyncGenerator[Broker]:
    if case[0] == "memory":
        yield MemoryBroker()
        return
    try:
        async with open_amqp_broker(AMQP_URL, prefix=prefix) as amqp:
            yield amqp
    finally:
        with anyio.CancelScope(shield=True):
            await delete_amqp_layout(AMQP_URL, prefix=prefix, queues=QUEUES)


def dispatch(number: int, queue: str = DEFAULT_QUEUE) -> Dispatch:
    return Dispatch(task_id=f"task-{number}", run_id=f"run-{number}", attempt=1, queue=queue)


async def stats_of(broker: Broker, queue: str) -> QueueStats:
    [stats] = await broker.queue_stats([queue])
    return stats


async def test_a_message_goes_only_to_the_consumers_of_its_queue(broker: Broker) -> None:
    async with (
        broker.consume(prefetch=10, queue="b") as on_b,
        broker.consume(prefetch=10) as on_default,
        broker.consume(prefetch=10, queue="a") as on_a,
    ):
        published = [dispatch(1, "a"), dispatch(2, "b"), dispatch(3), dispatch(4, "a")]
        assert await broker.publish(published) == published
        got_a = await receive(on_a, 2)
        got_b = await receive(on_b, 1)
        got_default = await receive(on_default, 1)
        assert [d.dispatch for d in got_a] == [published[0], published[3]]
        assert [d.dispatch for d in got_b] == [published[1]]
        assert [d.dispatch for d in got_default] == [published[2]]
        for delivery in [*got_a, *got_b, *got_default]:
            await delivery.ack()
        await assert_nothing_arrives(on_a)


async def test_a_message_for_a_queue_nobody_serves_waits_there(broker: Broker) -> None:
    assert await stats_of(broker, "a") == QueueStats("a", 0, 0)
    async with broker.consume(prefetch=10, queue="b") as on_b:
        await broker.publish([dispatch(1, "a")])

        async def waiting() -> bool:
            return await stats_of(broker, "a") == QueueStats("a", 1, 0)

        await eventually(waiting, within=WAIT)
        assert await stats_of(broker, "b") == QueueStats("b", 0, 1)
        async with broker.consume(prefetch=10, queue="a") as on_a:
            [delivery] = await receive(on_a, 1)
            assert delivery.dispatch == dispatch(1, "a")
            await delivery.ack()

            async def taken() -> bool:
                return await stats_of(broker, "a") == QueueStats("a", 0, 1)

            await eventually(taken, within=WAIT)
        await assert_nothing_arrives(on_b)


async def test_queue_stats_come_in_the_order_asked(broker: Broker) -> None:
    await broker.publish([dispatch(1), dispatch(2, "b"), dispatch(3, "b")])

    async def counted() -> bool:
        stats = await broker.queue_stats(["b", "a", DEFAULT_QUEUE])
        return stats == [QueueStats("b", 2, 0), QueueStats("a", 0, 0), QueueStats("default", 1, 0)]

    await eventually(counted, within=WAIT)
    assert await broker.queue_depth() == 1  # the default queue's


async def test_a_default_dispatch_is_encoded_as_before_queues_existed() -> None:
    default = Dispatch(task_id="t", run_id="r", attempt=2)
    assert msgspec.json.encode(default) == b'{"task_id":"t","run_id":"r","attempt":2}'
    routed = msgspec.json.encode(Dispatch(task_id="t", run_id="r", attempt=2, queue="a"))
    assert routed == b'{"task_id":"t","run_id":"r","attempt":2,"queue":"a"}'


@pytest.mark.parametrize("case", [pytest.param(("amqp", "uvloop"), id="amqp")])
async def test_rabbitmq_names_a_queue_after_the_default_one(broker: Broker, prefix: str) -> None:
    """The default queue keeps ``tasks_queue`` and ``task.dispatch``; queue ``a`` is
    ``tasks_queue.a``, bound with ``task.dispatch.a``; both are quorum queues."""
    assert isinstance(broker, AmqpBroker)
    layout = AmqpLayout.for_prefix(prefix)
    assert layout.queue_for(DEFAULT_QUEUE) == f"{prefix}tasks_queue"
    assert layout.routing_key_for(DEFAULT_QUEUE) == ROUTING_KEY == "task.dispatch"
    assert layout.queue_for("a") == f"{prefix}tasks_queue.a"
    assert layout.routing_key_for("a") == "task.dispatch.a"
    await broker.publish([dispatch(1, "a")])
    async with amqp_channel() as channel:
        # Published from outside with the routing key alone, it lands in tasks_queue.a.
        await channel.basic_publish(
            b"{}", exchange=layout.exchange, routing_key="task.dispatch.a", mandatory=True
        )
        declared = await channel.queue_declare(
            layout.queue_for("a"),
            durable=True,
            # Declaring it with other arguments would fail: it is the quorum queue.
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 5,
                "x-dead-letter-exchange": layout.dead_letter_exchange,
            },
        )
        assert declared.message_count == 2
    await delete_amqp_layout(AMQP_URL, prefix=prefix, queues=["a"])
    async with amqp_channel() as channel:
        with pytest.raises(aiormq.ChannelNotFoundEntity):
            await channel.queue_declare(layout.queue_for("a"), passive=True)

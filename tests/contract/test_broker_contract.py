"""The ``Broker`` contract: every adapter runs through the same cases.

The memory broker runs on asyncio and trio; the AMQP broker (asyncio only) runs against the
real RabbitMQ under a per-test prefix, and its exchanges and queues are deleted afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiormq
import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import pytest
from aiormq.abc import AbstractChannel
from pamqp import commands as spec

from app.adapters.amqp_broker import AmqpBroker, delete_amqp_layout, open_amqp_broker
from app.adapters.memory_broker import MemoryBroker
from app.ports import DELIVERY_LIMIT, Broker, Delivery, Dispatch
from tests.brokers import publish_raw as publish_raw_amqp
from tests.brokers import put_raw, take_dead_letters
from tests.conftest import AMQP_URL, anyio_param, eventually

WAIT = 10.0
"""Bound for anything that should happen."""
QUIET = 0.5
"""How long to watch for something that must not happen."""

CASES = [
    pytest.param(("memory", "asyncio"), id="memory-asyncio"),
    pytest.param(("memory", "trio"), id="memory-trio"),
    pytest.param(("amqp", "uvloop"), id="amqp-uvloop"),
]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str | tuple[str, dict[str, Any]]:
    return anyio_param(case[1])


@pytest.fixture
async def broker(case: tuple[str, str], prefix: str) -> AsyncGenerator[Broker, None]:
    if case[0] == "memory":
        yield MemoryBroker()
        return
    try:
        async with open_amqp_broker(AMQP_URL, prefix=prefix) as amqp:
            yield amqp
    finally:
        with anyio.CancelScope(shield=True):
            await delete_amqp_layout(AMQP_URL, prefix=prefix)


def dispatches(count: int) -> list[Dispatch]:
    return [Dispatch(task_id=f"task-{i}", run_id=f"run-{i}", attempt=1) for i in range(count)]


PublishRaw = Callable[[bytes], Awaitable[None]]
"""Puts an arbitrary body on the broker's queue, as a publisher other than taskq would."""
TakeDeadLetters = Callable[[], Awaitable[list[bytes]]]
"""Removes and returns the bodies now in the broker's dead-letter queue."""


@pytest.fixture
def publish_raw(case: tuple[str, str], broker: Broker) -> PublishRaw:
    async def put_on_memory(body: bytes) -> None:
        assert isinstance(broker, MemoryBroker)
        put_raw(broker, body)

    async def publish_on_amqp(body: bytes) -> None:
        assert isinstance(broker, AmqpBroker)
        assert await publish_raw_amqp(broker, body)

    return put_on_memory if case[0] == "memory" else publish_on_amqp


@pytest.fixture
def dead_letters(case: tuple[str, str], broker: Broker) -> TakeDeadLetters:
    async def take_from_memory() -> list[bytes]:
        assert isinstance(broker, MemoryBroker)
        await anyio.lowlevel.checkpoint()
        return take_dead_letters(broker)

    async def take_from_amqp() -> list[bytes]:
        assert isinstance(broker, AmqpBroker)
        bodies: list[bytes] = []
        async with amqp_channel() as channel:
            while True:
                message = await channel.basic_get(broker.dead_letter_queue, no_ack=True)
                if isinstance(message.delivery, spec.Basic.GetEmpty):
                    return bodies
                bodies.append(message.body)

    return take_from_memory if case[0] == "memory" else take_from_amqp


async def wait_for_dead_letters(dead_letters: TakeDeadLetters, count: int) -> list[bytes]:
    # Dead-lettering is asynchronous in RabbitMQ: poll, within a bound.
    bodies: list[bytes] = []
    with anyio.fail_after(WAIT):
        while len(bodies) < count:
            bodies += await dead_letters()
            if len(bodies) < count:
                await anyio.sleep(0.02)
    return bodies


@asynccontextmanager
async def amqp_channel() -> AsyncGenerator[AbstractChannel, None]:
    """A channel on a connection of its own, to look at RabbitMQ from the outside."""
    async with aiormq.connect(AMQP_URL) as connection:
        yield await connection.channel()


async def receive(deliveries: AsyncIterator[Delivery], count: int) -> list[Delivery]:
    received: list[Delivery] = []
    with anyio.fail_after(WAIT):
        while len(received) < count:
            received.append(await anext(deliveries))
    return received


async def assert_nothing_arrives(deliveries: AsyncIterator[Delivery]) -> None:
    """No delivery within ``QUIET`` seconds (this cancels the wait: use it last)."""
    with anyio.move_on_after(QUIET) as quiet:
        extra = await anext(deliveries)
        pytest.fail(f"unexpected delivery: {extra.dispatch}")
    assert quiet.cancelled_caught


async def test_ping(broker: Broker) -> None:
    with anyio.fail_after(WAIT):
        await broker.ping()


async def test_queue_depth_counts_messages_not_yet_delivered(broker: Broker) -> None:
    with anyio.fail_after(WAIT):
        assert await broker.queue_depth() == 0
        await broker.publish(dispatches(3))
        await eventually(lambda: depth_is(broker, 3))
    async with broker.consume(prefetch=1) as deliveries:
        (delivery,) = await receive(deliveries, 1)
        await eventually(lambda: depth_is(broker, 2))  # one delivered, unsettled
        await delivery.ack()


async def depth_is(broker: Broker, expected: int) -> bool:
    return await broker.queue_depth() == expected


async def test_publish_nothing(broker: Broker) -> None:
    with anyio.fail_after(WAIT):
        assert await broker.publish([]) == []


async def test_round_trip(broker: Broker) -> None:
    messages = dispatches(3)
    with anyio.fail_after(WAIT):
        assert await broker.publish(messages) == messages
    async with broker.consume(prefetch=10) as deliveries:
        received = await receive(deliveries, 3)
        assert [d.dispatch for d in received] == messages
        assert not any(d.redelivered for d in received)
        for delivery in received:
            await delivery.ack()
        await assert_nothing_arrives(deliveries)


async def test_many_arrive_once_in_order(broker: Broker) -> None:
    messages = dispatches(2000)
    with anyio.fail_after(WAIT):
        assert await broker.publish(messages) == messages
    async with broker.consume(prefetch=100) as deliveries:
        received: list[Dispatch | None] = []
        with anyio.fail_after(WAIT):
            async for delivery in deliveries:
                received.append(delivery.dispatch)
                await delivery.ack()
                if len(received) == len(messages):
                    break
        assert received == messages
        await assert_nothing_arrives(deliveries)


async def test_prefetch_is_honoured(broker: Broker) -> None:
    with anyio.fail_after(WAIT):
        await broker.publish(dispatches(5))
    async with broker.consume(prefetch=2) as deliveries:
        first, _second = await receive(deliveries, 2)
        third: list[Delivery] = []
        arrived = anyio.Event()

        async def take_third() -> None:
            third.append(await anext(deliveries))
            arrived.set()

        async with anyio.create_task_group() as tg:
            # Waiting in a task of its own: the pending ``anext`` is not cancelled.
            tg.start_soon(take_third)
            with anyio.move_on_after(QUIET) as quiet:
                await arrived.wait()
            assert quiet.cancelled_caught, "a third delivery arrived with prefetch=2"
            await first.ack()
            with anyio.fail_after(WAIT):
                await arrived.wait()
        assert third[0].dispatch == dispatches(5)[2]


async def test_unsettled_comes_back_redelivered(broker: Broker) -> None:
    [message] = dispatches(1)
    with anyio.fail_after(WAIT):
        await broker.publish([message])
    async with broker.consume(prefetch=1) as deliveries:
        [first] = await receive(deliveries, 1)
        assert first.dispatch == message
        assert not first.redelivered
    async with broker.consume(prefetch=1) as deliveries:
        [again] = await receive(deliveries, 1)
        assert again.dispatch == message
        assert again.redelivered
        await again.ack()
        await assert_nothing_arrives(deliveries)


async def test_acks_in_any_order_leave_exactly_the_unsettled_delivery(broker: Broker) -> None:
    messages = dispatches(6)
    with anyio.fail_after(WAIT):
        await broker.publish(messages)
    async with broker.consume(prefetch=6) as deliveries:
        received = await receive(deliveries, 6)
        assert [d.dispatch for d in received] == messages
        with anyio.fail_after(WAIT):
            await received[5].ack()  # the newest first, while older ones are unsettled
            async with anyio.create_task_group() as tg:
                for index in (4, 1, 0, 3):  # all but received[2], at once
                    tg.start_soon(received[index].ack)
    async with broker.consume(prefetch=6) as deliveries:
        [again] = await receive(deliveries, 1)
        assert again.dispatch == messages[2]
        assert again.redelivered
        await again.ack()
        await assert_nothing_arrives(deliveries)


async def test_acks_around_deliveries_requeued_or_dead_lettered_later_settle_only_their_own(
    broker: Broker, dead_letters: TakeDeadLetters
) -> None:
    messages = dispatches(5)
    with anyio.fail_after(WAIT):
        await broker.publish(messages)
    async with broker.consume(prefetch=5) as deliveries:
        received = await receive(deliveries, 5)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for index in (0, 2, 4):
                    tg.start_soon(received[index].ack)
            async with anyio.create_task_group() as tg:
                tg.start_soon(received[1].requeue)
                tg.start_soon(received[3].dead_letter)
        [again] = await receive(deliveries, 1)
        assert again.dispatch == messages[1]
        assert again.redelivered
        await again.ack()
    [dead] = await wait_for_dead_letters(dead_letters, 1)
    assert msgspec.json.decode(dead, type=Dispatch) == messages[3]
    async with broker.consume(prefetch=5) as deliveries:
        await assert_nothing_arrives(deliveries)


async def test_settling_after_the_consumer_stopped_does_nothing(broker: Broker) -> None:
    [message] = dispatches(1)
    with anyio.fail_after(WAIT):
        await broker.publish([message])
    async with broker.consume(prefetch=1) as deliveries:
        [first] = await receive(deliveries, 1)
    with anyio.fail_after(WAIT):
        await first.ack()
    async with broker.consume(prefetch=1) as deliveries:
        [again] = await receive(deliveries, 1)
        assert again.dispatch == message
        assert again.redelivered
        await again.ack()


async def test_requeue_brings_it_back(broker: Broker) -> None:
    [message] = dispatches(1)
    with anyio.fail_after(WAIT):
        await broker.publish([message])
    async with broker.consume(prefetch=1) as deliveries:
        [first] = await receive(deliveries, 1)
        await first.requeue()
        [again] = await receive(deliveries, 1)
        assert again.dispatch == message
        assert again.redelivered
        await again.ack()
        await assert_nothing_arrives(deliveries)


async def test_dead_letter_moves_it_to_the_dead_letter_queue(
    broker: Broker, dead_letters: TakeDeadLetters
) -> None:
    messages = dispatches(2)
    with anyio.fail_after(WAIT):
        await broker.publish(messages)
    async with broker.consume(prefetch=2) as deliveries:
        poison, healthy = await receive(deliveries, 2)
        await poison.dead_letter()
        await healthy.ack()
        [body] = await wait_for_dead_letters(dead_letters, 1)
        assert msgspec.json.decode(body, type=Dispatch) == messages[0]
        await assert_nothing_arrives(deliveries)
    assert await dead_letters() == []


async def test_delivery_limit_dead_letters_a_message_requeued_forever(
    broker: Broker, dead_letters: TakeDeadLetters
) -> None:
    [message] = dispatches(1)
    with anyio.fail_after(WAIT):
        await broker.publish([message])
    deliveries_seen = 0
    async with broker.consume(prefetch=1) as deliveries:
        with anyio.move_on_after(QUIET * 4) as quiet:
            async for delivery in deliveries:
                deliveries_seen += 1
                await delivery.requeue()
        assert quiet.cancelled_caught
    assert deliveries_seen == DELIVERY_LIMIT + 1
    [body] = await wait_for_dead_letters(dead_letters, 1)
    assert body == b'{"task_id":"task-0","run_id":"run-0","attempt":1}'


async def test_dead_letters_are_consumed_from_their_own_queue(
    broker: Broker, dead_letters: TakeDeadLetters
) -> None:
    messages = dispatches(2)
    with anyio.fail_after(WAIT):
        await broker.publish(messages)
    async with broker.consume(prefetch=2) as deliveries:
        for delivery in await receive(deliveries, 2):
            await delivery.dead_letter()
    async with broker.consume_dead_letters(prefetch=2) as dead:
        first, second = await receive(dead, 2)
        assert [first.dispatch, second.dispatch] == messages
        await first.ack()
        # Leaving `second` unsettled gives it back to the dead-letter queue.
    async with broker.consume_dead_letters(prefetch=2) as dead:
        [again] = await receive(dead, 1)
        assert again.dispatch == messages[1]
        await again.dead_letter()  # from the dead-letter queue: dropped
        await assert_nothing_arrives(dead)
    async with broker.consume(prefetch=1) as deliveries:
        await assert_nothing_arrives(deliveries)
    assert await dead_letters() == []


async def test_undecodable_body_has_no_dispatch(
    broker: Broker, publish_raw: PublishRaw, dead_letters: TakeDeadLetters
) -> None:
    with anyio.fail_after(WAIT):
        await publish_raw(b"not json at all")
        await publish_raw(b'{"task_id": 7}')
        await broker.publish(dispatches(1))
    async with broker.consume(prefetch=3) as deliveries:
        garbage, wrong_shape, valid = await receive(deliveries, 3)
        assert garbage.dispatch is None
        assert wrong_shape.dispatch is None
        assert valid.dispatch == dispatches(1)[0]
        for delivery in (garbage, wrong_shape):
            await delivery.dead_letter()
        await valid.ack()
        assert sorted(await wait_for_dead_letters(dead_letters, 2)) == sorted(
            [b"not json at all", b'{"task_id": 7}']
        )


async def test_two_consumers_share_the_queue(broker: Broker) -> None:
    messages = dispatches(200)
    taken: dict[str, list[Dispatch | None]] = {"a": [], "b": []}
    all_taken = anyio.Event()

    async def consumer(
        name: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with broker.consume(prefetch=1) as deliveries:
            task_status.started()
            async for delivery in deliveries:
                taken[name].append(delivery.dispatch)
                await anyio.lowlevel.checkpoint()  # let the other consumer have a turn
                await delivery.ack()
                if sum(map(len, taken.values())) >= len(messages):
                    all_taken.set()

    async with anyio.create_task_group() as tg:
        await tg.start(consumer, "a")
        await tg.start(consumer, "b")
        with anyio.fail_after(WAIT):
            assert await broker.publish(messages) == messages
            await all_taken.wait()
        await anyio.sleep(QUIET)  # room for a duplicate to show up
        tg.cancel_scope.cancel()

    everything = taken["a"] + taken["b"]
    assert sorted(everything, key=_run_id) == sorted(messages, key=_run_id)
    assert taken["a"]
    assert taken["b"]


def _run_id(dispatch: Dispatch | None) -> str:
    assert dispatch is not None
    return dispatch.run_id

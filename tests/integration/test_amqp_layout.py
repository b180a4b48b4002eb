"""What only the AMQP broker has: its RabbitMQ layout, message properties, the delivery
limit, and how it fails when the connection or the queue goes away.

RabbitMQ's own view is read with ``rabbitmqctl`` and a separate aiormq connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import pytest

from app.adapters.amqp_broker import (
    DELIVERY_LIMIT,
    ROUTING_KEY,
    AmqpBroker,
    AmqpDelivery,
    BrokerUnavailable,
    delete_amqp_layout,
    open_amqp_broker,
)
from app.ports import Delivery, Dispatch
from tests.brokers import publish_raw
from tests.conftest import AMQP_URL, RABBITMQ_NODE, eventually
from tests.contract.test_broker_contract import (
    WAIT,
    amqp_channel,
    dispatches,
    receive,
)


def connection_name(prefix: str) -> str:
    return f"{prefix}connection"


@pytest.fixture
async def broker(prefix: str) -> AsyncGenerator[AmqpBroker, None]:
    url = f"{AMQP_URL}?name={connection_name(prefix)}"
    try:
        async with open_amqp_broker(url, prefix=prefix) as amqp:
            yield amqp
    finally:
        with anyio.CancelScope(shield=True):
            await delete_amqp_layout(AMQP_URL, prefix=prefix)


async def rabbitmqctl(*args: str) -> str:
    if RABBITMQ_NODE is not None:  # the test session's own node
        return await RABBITMQ_NODE.ctl("--quiet", *args)
    with anyio.fail_after(60):
        result = await anyio.run_process(["rabbitmqctl", "--quiet", *args])
    return result.stdout.decode()


async def rabbitmqctl_json(*args: str) -> list[dict[str, Any]]:
    return json.loads(await rabbitmqctl(*args, "--formatter", "json"))


def arguments(queue: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, _type, value in queue["arguments"]}


async def test_layout(broker: AmqpBroker, prefix: str) -> None:
    queues = {
        q["name"]: q
        for q in await rabbitmqctl_json("list_queues", "name", "durable", "type", "arguments")
        if q["name"].startswith(prefix)
    }
    assert set(queues) == {broker.queue_name, broker.dead_letter_queue}
    tasks_queue = queues[f"{prefix}tasks_queue"]
    assert tasks_queue["durable"]
    assert tasks_queue["type"] == "quorum"
    assert arguments(tasks_queue) == {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": f"{prefix}tasks.dead",
    }
    dead = queues[f"{prefix}tasks_dead"]
    assert dead["durable"]
    assert dead["type"] == "quorum", "replicated: declarable while any majority of nodes is up"

    exchanges = {
        e["name"]: e
        for e in await rabbitmqctl_json("list_exchanges", "name", "type", "durable")
        if e["name"].startswith(prefix)
    }
    assert exchanges == {
        f"{prefix}tasks": {"name": f"{prefix}tasks", "type": "direct", "durable": True},
        f"{prefix}tasks.dead": {"name": f"{prefix}tasks.dead", "type": "fanout", "durable": True},
    }
    assert (broker.exchange, broker.dead_letter_exchange) == (
        f"{prefix}tasks",
        f"{prefix}tasks.dead",
    )

    bindings = {
        (b["source_name"], b["destination_name"], b["routing_key"])
        for b in await rabbitmqctl_json(
            "list_bindings", "source_name", "destination_name", "routing_key"
        )
        if b["source_name"].startswith(prefix)
    }
    assert bindings == {
        (f"{prefix}tasks", f"{prefix}tasks_queue", ROUTING_KEY),
        (f"{prefix}tasks.dead", f"{prefix}tasks_dead", ""),
    }


async def test_opening_again_declares_the_same_layout(broker: AmqpBroker, prefix: str) -> None:
    async with open_amqp_broker(AMQP_URL, prefix=prefix) as again:
        await again.ping()
        assert await again.publish(dispatches(1)) == dispatches(1)


async def test_a_classic_dead_letter_queue_of_an_older_taskq_is_kept(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # What taskq declared before the dead-letter queue became a quorum queue: RabbitMQ
    # refuses to change a queue's type, so the broker takes the queue as it is.
    dead_letter_queue = f"{prefix}tasks_dead"
    try:
        async with amqp_channel() as channel:
            await channel.queue_declare(dead_letter_queue, durable=True)
        with caplog.at_level(logging.WARNING, logger="app.adapters.amqp_broker"):
            async with open_amqp_broker(AMQP_URL, prefix=prefix) as broker:
                await broker.publish(dispatches(1))
                async with broker.consume(prefetch=1) as deliveries:
                    [delivery] = await receive(deliveries, 1)
                    await delivery.dead_letter()
                async with broker.consume_dead_letters(prefetch=1) as dead:
                    [letter] = await receive(dead, 1)
                    assert letter.dispatch == dispatches(1)[0]
                    await letter.ack()
        assert any("is a classic queue" in r.getMessage() for r in caplog.records)
        queues = await rabbitmqctl_json("list_queues", "name", "type")
        assert {"name": dead_letter_queue, "type": "classic"} in queues
    finally:
        with anyio.CancelScope(shield=True):
            await delete_amqp_layout(AMQP_URL, prefix=prefix)


async def test_deleting_a_classic_dead_letter_queue_makes_it_a_quorum_one(prefix: str) -> None:
    # The README's upgrade path: delete the old classic queue while taskq runs; the
    # scheduler's dead-letter consumer declares it again at once, as a quorum queue.
    dead_letter_queue = f"{prefix}tasks_dead"

    async def queue_type() -> str | None:
        queues = await rabbitmqctl_json("list_queues", "name", "type")
        return next((q["type"] for q in queues if q["name"] == dead_letter_queue), None)

    try:
        async with amqp_channel() as channel:
            await channel.queue_declare(dead_letter_queue, durable=True)
        async with (
            open_amqp_broker(AMQP_URL, prefix=prefix) as broker,
            broker.consume_dead_letters(prefetch=1) as dead,
        ):
            assert await queue_type() == "classic"
            letters: list[Delivery] = []

            async def take_letter() -> None:  # as the scheduler does, all along
                letters.extend(await receive(dead, 1))

            async with anyio.create_task_group() as group:
                group.start_soon(take_letter)
                async with amqp_channel() as channel:
                    await channel.queue_delete(dead_letter_queue)

                async def quorum() -> bool:
                    return await queue_type() == "quorum"

                await eventually(quorum, within=WAIT, every=0.1)
                await broker.publish(dispatches(1))
                async with broker.consume(prefetch=1) as deliveries:
                    [delivery] = await receive(deliveries, 1)
                    await delivery.dead_letter()
            [letter] = letters
            assert letter.dispatch == dispatches(1)[0], "bound again to the dead-letter exchange"
            await letter.ack()
    finally:
        with anyio.CancelScope(shield=True):
            await delete_amqp_layout(AMQP_URL, prefix=prefix)


async def test_delete_amqp_layout_leaves_nothing(prefix: str) -> None:
    async with open_amqp_broker(AMQP_URL, prefix=prefix) as broker:
        await broker.publish(dispatches(3))
    await delete_amqp_layout(AMQP_URL, prefix=prefix)
    for listing in ("list_queues", "list_exchanges"):
        names = (await rabbitmqctl(listing, "name")).split()
        assert not [name for name in names if name.startswith(prefix)]


async def test_messages_are_persistent_json(broker: AmqpBroker) -> None:
    [message] = dispatches(1)
    with anyio.fail_after(WAIT):
        await broker.publish([message])
    async with broker.consume(prefetch=1) as deliveries:
        [delivery] = await receive(deliveries, 1)
        assert isinstance(delivery, AmqpDelivery)
        assert delivery.properties.delivery_mode == 2
        assert delivery.properties.content_type == "application/json"
        assert delivery.body == b'{"task_id":"task-0","run_id":"run-0","attempt":1}'
        await delivery.ack()


async def test_unroutable_is_not_confirmed(broker: AmqpBroker) -> None:
    async with amqp_channel() as channel:
        await channel.queue_unbind(broker.queue_name, broker.exchange, ROUTING_KEY)
        with anyio.fail_after(WAIT):
            assert await broker.publish(dispatches(3)) == []
            assert not await publish_raw(broker, b"{}")
        await channel.queue_bind(broker.queue_name, broker.exchange, ROUTING_KEY)
        with anyio.fail_after(WAIT):
            assert await broker.publish(dispatches(2)) == dispatches(2)
        declared = await channel.queue_declare(broker.queue_name, passive=True)
        assert declared.message_count == 2


async def test_a_lost_connection_is_healed(broker: AmqpBroker, prefix: str) -> None:
    [before, after] = dispatches(2)
    with anyio.fail_after(WAIT):
        await broker.publish([before])
    async with broker.consume(prefetch=1) as deliveries:
        [unsettled] = await receive(deliveries, 1)
        connections = await rabbitmqctl("list_connections", "pid", "client_properties")
        [pid] = [
            line.split("\t")[0]
            for line in connections.splitlines()
            if connection_name(prefix) in line
        ]
        await rabbitmqctl("close_connection", pid, "taskq test: connection loss")
        # Settling on the dead channel does nothing: RabbitMQ gives the message back.
        await unsettled.ack()

        async def publishes() -> bool:
            try:
                await broker.ping()
                return await broker.publish([after]) == [after]
            except BrokerUnavailable:
                return False  # reconnecting

        await eventually(publishes, within=WAIT, every=0.05)
        # The consumer goes on, on a fresh channel: the old message again, then the new.
        [again] = await receive(deliveries, 1)
        assert (again.dispatch, again.redelivered) == (before, True)
        await again.ack()
        [new] = await receive(deliveries, 1)
        assert new.dispatch == after
        await new.ack()


async def test_a_queue_deleted_under_a_consumer_is_declared_again(broker: AmqpBroker) -> None:
    async with broker.consume(prefetch=1) as deliveries:
        async with amqp_channel() as channel:
            await channel.queue_delete(broker.queue_name)
        [message] = dispatches(1)

        results: list[Delivery] = []
        arrived = anyio.Event()

        async def take() -> None:
            results.append(await anext(deliveries))
            arrived.set()

        async def published() -> bool:
            # Unroutable until the consumer has declared the queue again.
            return await broker.publish([message]) == [message]

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await eventually(published, within=WAIT, every=0.05)
            with anyio.fail_after(WAIT):
                await arrived.wait()
        assert results[0].dispatch == message


async def test_connect_failure_raises_broker_unavailable() -> None:
    with anyio.fail_after(WAIT), pytest.raises(BrokerUnavailable):
        async with open_amqp_broker("amqp://guest:guest@127.0.0.1:1/", prefix="unused:"):
            pass


async def test_concurrent_publishes_are_all_confirmed(broker: AmqpBroker) -> None:
    batches = [
        [Dispatch(task_id=f"t{b}-{i}", run_id=f"r{b}-{i}", attempt=1) for i in range(300)]
        for b in range(4)
    ]
    results: list[list[Dispatch]] = []

    async def publish(batch: list[Dispatch]) -> None:
        results.append(await broker.publish(batch))

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for batch in batches:
                tg.start_soon(publish, batch)
    assert sorted(map(len, results)) == [300] * 4
    async with amqp_channel() as channel:
        declared = await channel.queue_declare(broker.queue_name, passive=True)
        assert declared.message_count == 1200

"""Putting messages on a broker's queue the way a publisher other than taskq would: the
test seams that production adapters do not carry."""

from __future__ import annotations

import aiormq
from pamqp import commands as spec

from app.adapters.amqp_broker import ROUTING_KEY, AmqpBroker
from app.adapters.memory_broker import MemoryBroker, _Message  # pyright: ignore[reportPrivateUsage]
from tests.conftest import AMQP_URL


def put_raw(broker: MemoryBroker, body: bytes) -> None:
    """Put an arbitrary body on the memory broker's queue (a poison message)."""
    broker._queue.put([_Message(body)])  # pyright: ignore[reportPrivateUsage]


def take_dead_letters(broker: MemoryBroker) -> list[bytes]:
    """Remove and return the bodies waiting in the memory broker's dead-letter queue."""
    bodies = list(broker.dead_letters)
    broker._dead.messages.clear()  # pyright: ignore[reportPrivateUsage]
    return bodies


async def publish_raw(broker: AmqpBroker, body: bytes) -> bool:
    """Publish an arbitrary body to the broker's exchange on a connection of its own, as
    taskq publishes (persistent, mandatory); whether RabbitMQ confirmed it."""
    async with aiormq.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        try:
            confirmation = await channel.basic_publish(
                body,
                exchange=broker.exchange,
                routing_key=ROUTING_KEY,
                properties=spec.Basic.Properties(delivery_mode=2),
                mandatory=True,
            )
        except aiormq.DeliveryError:
            return False  # nacked, or returned as unroutable
    return isinstance(confirmation, spec.Basic.Ack)

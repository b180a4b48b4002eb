"""The in-memory broker: the reference behaviour of ``Broker``, and dev mode's broker.

Bodies travel encoded, as over AMQP. A delivery left unsettled when its consumer
stops goes back to the head of the queue, as RabbitMQ does on channel close.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import msgspec

from app.ports import Delivery, Dispatch

_decoder = msgspec.json.Decoder(Dispatch)


class _Message:
    __slots__ = ("body", "redelivered")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.redelivered = False


class MemoryDelivery:
    """Implements ``Delivery`` for ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker, message: _Message, consumer: _Consumer) -> None:
        self._broker = broker
        self._message = message
        self._consumer = consumer
        try:
            self._dispatch: Dispatch | None = _decoder.decode(message.body)
        except msgspec.DecodeError:
            self._dispatch = None

    @property
    def dispatch(self) -> Dispatch | None:
        return self._dispatch

    @property
    def redelivered(self) -> bool:
        return self._message.redelivered

    @property
    def body(self) -> bytes:
        return self._message.body

    async def ack(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._settle()

    async def requeue(self) -> None:
        await anyio.lowlevel.checkpoint()
        if self._settle():
            self._broker.return_to_queue([self._message])

    async def dead_letter(self) -> None:
        await anyio.lowlevel.checkpoint()
        if self._settle():
            self._broker.dead_letters.append(self._message.body)

    def _settle(self) -> bool:
        if self._message not in self._consumer.unsettled:
            return False
        self._consumer.unsettled.remove(self._message)
        self._consumer.settled()
        return True


class _Consumer:
    def __init__(self) -> None:
        self.unsettled: list[_Message] = []
        self._changed = anyio.Event()

    def settled(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for_room(self, prefetch: int) -> None:
        while len(self.unsettled) >= prefetch:
            await self._changed.wait()


class MemoryBroker:
    """Implements ``Broker`` with an in-process queue and a dead-letter list."""

    def __init__(self) -> None:
        self.queue: deque[_Message] = deque()
        self.dead_letters: list[bytes] = []
        self._arrived = anyio.Event()

    async def ping(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def publish(self, messages: Sequence[Dispatch]) -> list[Dispatch]:
        await anyio.lowlevel.checkpoint()
        self.queue.extend(_Message(msgspec.json.encode(m)) for m in messages)
        self._notify()
        return list(messages)

    def publish_raw(self, body: bytes) -> None:
        """Put an arbitrary body on the queue (to test poison messages)."""
        self.queue.append(_Message(body))
        self._notify()

    def return_to_queue(self, messages: Sequence[_Message]) -> None:
        for message in reversed(messages):
            message.redelivered = True
            self.queue.appendleft(message)
        self._notify()

    def _notify(self) -> None:
        self._arrived.set()
        self._arrived = anyio.Event()

    @asynccontextmanager
    async def consume(self, *, prefetch: int) -> AsyncGenerator[AsyncIterator[Delivery]]:
        consumer = _Consumer()
        deliveries = self._deliveries(consumer, prefetch)
        try:
            yield deliveries
        finally:
            await deliveries.aclose()
            unsettled, consumer.unsettled = consumer.unsettled, []
            self.return_to_queue(unsettled)

    async def _deliveries(
        self, consumer: _Consumer, prefetch: int
    ) -> AsyncGenerator[Delivery, None]:
        while True:
            await consumer.wait_for_room(prefetch)
            while not self.queue:
                await self._arrived.wait()
            message = self.queue.popleft()
            consumer.unsettled.append(message)
            yield MemoryDelivery(self, message, consumer)

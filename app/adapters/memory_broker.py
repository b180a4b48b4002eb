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

from app.ports import DELIVERY_LIMIT, Delivery, Dispatch, decode_dispatch


class _Message:
    __slots__ = ("body", "returns")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.returns = 0

    @property
    def redelivered(self) -> bool:
        return self.returns > 0


class MemoryDelivery:
    """Implements ``Delivery`` for ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker, message: _Message, consumer: _Consumer) -> None:
        self._broker = broker
        self._message = message
        self._consumer = consumer
        self._dispatch = decode_dispatch(message.body)

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
    """The deliveries of one ``consume``: an iterator that survives a cancelled wait."""

    def __init__(self, broker: MemoryBroker, prefetch: int) -> None:
        self.unsettled: list[_Message] = []
        self._broker = broker
        self._prefetch = prefetch
        self._changed = anyio.Event()

    def settled(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def __aiter__(self) -> _Consumer:
        return self

    async def __anext__(self) -> Delivery:
        while len(self.unsettled) >= self._prefetch:
            await self._changed.wait()
        message = await self._broker.take()
        self.unsettled.append(message)
        return MemoryDelivery(self._broker, message, self)


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
        """Give messages back (to the head, in order); past the delivery limit a message
        is dead-lettered instead, as a quorum queue does."""
        for message in reversed(messages):
            message.returns += 1
            if message.returns > DELIVERY_LIMIT:
                self.dead_letters.append(message.body)
            else:
                self.queue.appendleft(message)
        self._notify()

    async def take(self) -> _Message:
        while not self.queue:
            await self._arrived.wait()
        return self.queue.popleft()

    def _notify(self) -> None:
        self._arrived.set()
        self._arrived = anyio.Event()

    @asynccontextmanager
    async def consume(self, *, prefetch: int) -> AsyncGenerator[AsyncIterator[Delivery]]:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        consumer = _Consumer(self, prefetch)
        try:
            yield consumer
        finally:
            unsettled, consumer.unsettled = consumer.unsettled, []
            self.return_to_queue(unsettled)

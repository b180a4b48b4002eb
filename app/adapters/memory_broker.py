"""The in-memory broker: the reference behaviour of ``Broker``, and dev mode's broker.

Bodies travel encoded, as over AMQP. Each taskq queue is a queue of its own, made when
something is first sent to or consumed from it; all share one dead-letter queue. A
delivery left unsettled when its consumer stops goes back to the head of its queue, as
RabbitMQ does on channel close.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import anyio.lowlevel
import msgspec

from app.ports import (
    DEFAULT_QUEUE,
    DELIVERY_LIMIT,
    Delivery,
    Dispatch,
    QueueStats,
    decode_dispatch,
)


class _Message:
    __slots__ = ("body", "returns")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.returns = 0

    @property
    def redelivered(self) -> bool:
        return self.returns > 0


class _Queue:
    """Messages in order; a message given back goes to the head. With ``dead_letters``,
    one given back more than ``DELIVERY_LIMIT`` times goes there instead (a quorum
    queue); without, there is no limit (the classic dead-letter queue)."""

    def __init__(self, dead_letters: _Queue | None = None) -> None:
        self.messages: deque[_Message] = deque()
        self.dead_letters = dead_letters
        self.consumers = 0
        self._arrived = anyio.Event()

    def put(self, messages: Sequence[_Message]) -> None:
        self.messages.extend(messages)
        self._notify()

    def give_back(self, messages: Sequence[_Message]) -> None:
        for message in reversed(messages):
            message.returns += 1
            if self.dead_letters is not None and message.returns > DELIVERY_LIMIT:
                self.dead_letters.put([_Message(message.body)])
            else:
                self.messages.appendleft(message)
        self._notify()

    def reject(self, message: _Message) -> None:
        """Dead-letter it (dropped where there is no dead-letter queue, as in RabbitMQ)."""
        if self.dead_letters is not None:
            self.dead_letters.put([_Message(message.body)])

    async def take(self) -> _Message:
        while not self.messages:
            await self._arrived.wait()
        return self.messages.popleft()

    def _notify(self) -> None:
        self._arrived.set()
        self._arrived = anyio.Event()


class MemoryDelivery:
    """Implements ``Delivery`` for ``MemoryBroker``."""

    def __init__(self, message: _Message, consumer: _Consumer) -> None:
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
            self._consumer.queue.give_back([self._message])

    async def dead_letter(self) -> None:
        await anyio.lowlevel.checkpoint()
        if self._settle():
            self._consumer.queue.reject(self._message)

    def _settle(self) -> bool:
        if self._message not in self._consumer.unsettled:
            return False
        self._consumer.unsettled.remove(self._message)
        self._consumer.settled()
        return True


class _Consumer:
    """The deliveries of one ``consume``: an iterator that survives a cancelled wait."""

    def __init__(self, queue: _Queue, prefetch: int) -> None:
        self.queue = queue
        self.unsettled: list[_Message] = []
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
        message = await self.queue.take()
        self.unsettled.append(message)
        return MemoryDelivery(message, self)


class MemoryBroker:
    """Implements ``Broker`` with an in-process queue and a dead-letter queue."""

    def __init__(self) -> None:
        self._dead = _Queue()
        self._queues: dict[str, _Queue] = {}
        self._queue = self._named(DEFAULT_QUEUE)

    def _named(self, queue: str) -> _Queue:
        if (found := self._queues.get(queue)) is None:
            found = self._queues[queue] = _Queue(dead_letters=self._dead)
        return found

    @property
    def queue(self) -> Sequence[bytes]:
        """The bodies waiting in the default queue (a copy)."""
        return self.waiting(DEFAULT_QUEUE)

    def waiting(self, queue: str) -> Sequence[bytes]:
        """The bodies waiting in the taskq queue ``queue`` (a copy)."""
        found = self._queues.get(queue)
        return [] if found is None else [message.body for message in found.messages]

    @property
    def dead_letters(self) -> Sequence[bytes]:
        """The bodies waiting in the dead-letter queue (a copy)."""
        return [message.body for message in self._dead.messages]

    async def ping(self) -> str | None:
        await anyio.lowlevel.checkpoint()
        return None

    async def queue_depth(self) -> int:
        await anyio.lowlevel.checkpoint()
        return len(self._queue.messages)

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        await anyio.lowlevel.checkpoint()
        found = [self._queues.get(name) for name in queues]
        return [
            QueueStats(name, 0, 0) if q is None else QueueStats(name, len(q.messages), q.consumers)
            for name, q in zip(queues, found, strict=True)
        ]

    async def publish(self, messages: Sequence[Dispatch]) -> list[Dispatch]:
        await anyio.lowlevel.checkpoint()
        for message in messages:
            self._named(message.queue).put([_Message(msgspec.json.encode(message))])
        return list(messages)

    def consume(
        self, *, prefetch: int, queue: str = DEFAULT_QUEUE
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        return _consuming(self._named(queue), prefetch)

    def consume_dead_letters(
        self, *, prefetch: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        return _consuming(self._dead, prefetch)


@asynccontextmanager
async def _consuming(queue: _Queue, prefetch: int) -> AsyncGenerator[AsyncIterator[Delivery]]:
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, not {prefetch}")
    consumer = _Consumer(queue, prefetch)
    queue.consumers += 1
    try:
        yield consumer
    finally:
        queue.consumers -= 1
        unsettled, consumer.unsettled = consumer.unsettled, []
        queue.give_back(unsettled)

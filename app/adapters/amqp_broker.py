"""The AMQP broker: ``Broker`` over RabbitMQ, with aiormq (asyncio only).

Layout, every name under the key prefix (``AmqpLayout``):

- exchange ``tasks`` (direct, durable), the one dispatch messages are published to;
- queue ``tasks_queue`` (durable quorum queue with a delivery limit), bound to it with
  ``ROUTING_KEY``, the key ``publish`` uses, and dead-lettering to
- exchange ``tasks.dead`` (fanout, durable), which feeds the durable queue ``tasks_dead``.

Messages are persistent JSON, published ``mandatory`` with publisher confirms and a window
of outstanding confirms. The connection does not heal itself yet: once it is lost, every
operation raises ``BrokerUnavailable`` and the broker has to be opened again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, cast

import aiormq
import anyio
import anyio.lowlevel
import msgspec
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pamqp import commands as spec
from yarl import URL

from app.ports import DELIVERY_LIMIT, Delivery, Dispatch, decode_dispatch

ROUTING_KEY = "task.dispatch"
"""The routing key ``tasks_queue`` is bound with and every dispatch is published with."""

PUBLISH_WINDOW = 100
"""Publishes awaiting their confirm at once, per broker (one at a time caps throughput)."""

CONTENT_TYPE = "application/json"
PERSISTENT = 2

_CONNECT_TIMEOUT = 15.0
_RPC_TIMEOUT = 10.0
_CONFIRM_TIMEOUT = 30.0
_CLOSE_TIMEOUT = 5.0

# What aiormq raises when the connection or a channel is gone or does not answer
# (TimeoutError and ConnectionError are OSErrors; ChannelInvalidStateError is a RuntimeError).
_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    aiormq.AMQPError,
    aiormq.ChannelInvalidStateError,
    OSError,
)


class BrokerUnavailable(Exception):
    """RabbitMQ cannot be reached, closed the connection or a channel, or did not answer."""


@contextmanager
def _unavailable_on_error(what: str) -> Generator[None, None, None]:
    try:
        yield
    except BrokerUnavailable:
        raise
    except _UNAVAILABLE_ERRORS as exc:
        raise BrokerUnavailable(f"{what}: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class AmqpLayout:
    """The names of the exchanges and queues of one key prefix."""

    exchange: str
    queue: str
    dead_letter_exchange: str
    dead_letter_queue: str

    @classmethod
    def for_prefix(cls, prefix: str) -> AmqpLayout:
        return cls(
            exchange=f"{prefix}tasks",
            queue=f"{prefix}tasks_queue",
            dead_letter_exchange=f"{prefix}tasks.dead",
            dead_letter_queue=f"{prefix}tasks_dead",
        )


async def declare_layout(channel: AbstractChannel, layout: AmqpLayout) -> None:
    """Declare the exchanges, queues and bindings of ``layout`` (idempotent)."""
    await channel.exchange_declare(
        layout.dead_letter_exchange, exchange_type="fanout", durable=True
    )
    await channel.queue_declare(layout.dead_letter_queue, durable=True)
    await channel.queue_bind(layout.dead_letter_queue, layout.dead_letter_exchange)
    await channel.exchange_declare(layout.exchange, exchange_type="direct", durable=True)
    await channel.queue_declare(
        layout.queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": layout.dead_letter_exchange,
        },
    )
    await channel.queue_bind(layout.queue, layout.exchange, ROUTING_KEY)


async def delete_amqp_layout(url: str, *, prefix: str) -> None:
    """Delete every exchange and queue of ``prefix``, messages included (tests, tenant removal)."""
    layout = AmqpLayout.for_prefix(prefix)
    with _unavailable_on_error("cannot delete the AMQP layout"):
        with anyio.fail_after(_CONNECT_TIMEOUT + _RPC_TIMEOUT):
            connection = await aiormq.connect(url)
            try:
                channel = await connection.channel(publisher_confirms=False)
                for queue in (layout.queue, layout.dead_letter_queue):
                    await channel.queue_delete(queue)
                for exchange in (layout.exchange, layout.dead_letter_exchange):
                    await channel.exchange_delete(exchange)
            finally:
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    await connection.close(None)


def _properties() -> spec.Basic.Properties:
    # A fresh object each time: aiormq writes a message id into the properties it is given.
    return spec.Basic.Properties(content_type=CONTENT_TYPE, delivery_mode=PERSISTENT)


class AmqpDelivery:
    """Implements ``Delivery`` for ``AmqpBroker``: one message from ``tasks_queue``."""

    __slots__ = (
        "_consumer",
        "_dispatch",
        "_settled",
        "body",
        "delivery_tag",
        "properties",
        "redelivered",
    )

    def __init__(self, consumer: _Consumer, message: DeliveredMessage) -> None:
        self._consumer = consumer
        self._settled = False
        self.body: bytes = message.body
        self.properties: spec.Basic.Properties = message.header.properties
        """The AMQP properties the message was published with."""
        tag = message.delivery_tag
        if tag is None:  # pragma: no cover - only Basic.Deliver frames reach a consumer
            raise ValueError(f"a delivery without a delivery tag: {message!r}")
        self.delivery_tag: int = tag
        self.redelivered: bool = bool(message.redelivered)
        self._dispatch = decode_dispatch(message.body)

    @property
    def dispatch(self) -> Dispatch | None:
        return self._dispatch

    async def ack(self) -> None:
        await self._settle("ack", lambda channel, tag: channel.basic_ack(tag))

    async def requeue(self) -> None:
        await self._settle("requeue", lambda channel, tag: channel.basic_nack(tag, requeue=True))

    async def dead_letter(self) -> None:
        await self._settle(
            "dead-letter", lambda channel, tag: channel.basic_reject(tag, requeue=False)
        )

    async def _settle(
        self, what: str, settle: Callable[[AbstractChannel, int], Awaitable[None]]
    ) -> None:
        if self._settled or self._consumer.stopping:
            # As with the memory broker: settling twice, or after the consumer stopped
            # (its channel closed, so RabbitMQ has requeued the message), does nothing.
            await anyio.lowlevel.checkpoint()
            return
        self._settled = True
        with _unavailable_on_error(f"cannot {what} delivery {self.delivery_tag}"):
            await settle(self._consumer.channel, self.delivery_tag)


class _Consumer:
    """One ``basic_consume`` on its own channel, feeding a bounded stream."""

    def __init__(
        self, channel: AbstractChannel, send: MemoryObjectSendStream[AmqpDelivery]
    ) -> None:
        self.channel = channel
        self.stopping = False
        self.lost: str | None = None
        self._send = send

    async def on_message(self, message: DeliveredMessage) -> None:
        delivery = AmqpDelivery(self, message)
        try:
            # The stream holds ``prefetch`` items, and RabbitMQ never has more unsettled
            # on this channel, so this does not block; waiting (in order) is the fallback.
            self._send.send_nowait(delivery)
        except anyio.WouldBlock:
            with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._send.send(delivery)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # stopping: closing the channel gives the message back to the queue

    def on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        self._lose(f"RabbitMQ cancelled consumer {frame.consumer_tag} (queue deleted?)")

    def on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        reason = None if closing.cancelled() else closing.exception()
        self._lose(f"the consumer's channel closed: {reason!r}")

    def _lose(self, why: str) -> None:
        if self.stopping or self.lost is not None:
            return
        self.lost = why
        self._send.close()


class _Deliveries:
    """The async iterator ``AmqpBroker.consume`` yields."""

    def __init__(
        self, consumer: _Consumer, receive: MemoryObjectReceiveStream[AmqpDelivery]
    ) -> None:
        self._consumer = consumer
        self._receive = receive

    def __aiter__(self) -> _Deliveries:
        return self

    async def __anext__(self) -> Delivery:
        self._raise_if_lost()
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            self._raise_if_lost()
            raise StopAsyncIteration from None
        except anyio.ClosedResourceError:
            raise StopAsyncIteration from None

    def _raise_if_lost(self) -> None:
        # Deliveries still buffered are on a dead channel and could not be settled.
        if self._consumer.lost is not None:
            raise BrokerUnavailable(self._consumer.lost)


class AmqpBroker:
    """Implements ``Broker`` over one RabbitMQ connection; open it with ``open_amqp_broker``."""

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        control_channel: AbstractChannel,
        publish_channel: AbstractChannel,
        layout: AmqpLayout,
    ) -> None:
        self._connection = connection
        self._control_channel = control_channel
        self._control_lock = anyio.Lock()
        self._publish_channel = publish_channel
        self._window = anyio.Semaphore(PUBLISH_WINDOW)
        self.layout = layout

    @property
    def exchange(self) -> str:
        return self.layout.exchange

    @property
    def queue_name(self) -> str:
        return self.layout.queue

    @property
    def dead_letter_exchange(self) -> str:
        return self.layout.dead_letter_exchange

    @property
    def dead_letter_queue(self) -> str:
        return self.layout.dead_letter_queue

    @property
    def routing_key(self) -> str:
        return ROUTING_KEY

    async def ping(self) -> None:
        with _unavailable_on_error("RabbitMQ did not answer"), anyio.fail_after(_RPC_TIMEOUT):
            channel = await self._control()
            await channel.queue_declare(self.queue_name, passive=True)

    async def publish(self, messages: Sequence[Dispatch]) -> list[Dispatch]:
        confirmed = await self._publish_bodies([msgspec.json.encode(m) for m in messages])
        return [message for message, ok in zip(messages, confirmed, strict=True) if ok]

    async def publish_raw(self, body: bytes) -> bool:
        """Publish an arbitrary body (to test poison messages); whether it was confirmed."""
        [confirmed] = await self._publish_bodies([body])
        return confirmed

    async def _publish_bodies(self, bodies: Sequence[bytes]) -> list[bool]:
        channel = self._publish_channel
        if channel.is_closed or self._connection.is_closed:
            raise BrokerUnavailable("cannot publish: the publishing channel is closed")
        confirmed = [False] * len(bodies)
        failures: list[Exception] = []

        async def publish_one(index: int, body: bytes) -> None:
            try:
                with anyio.fail_after(_CONFIRM_TIMEOUT):
                    await channel.basic_publish(
                        body,
                        exchange=self.exchange,
                        routing_key=ROUTING_KEY,
                        properties=_properties(),
                        mandatory=True,
                    )
                confirmed[index] = True
            except aiormq.DeliveryError:
                pass  # nacked, or returned as unroutable (a PublishError): not confirmed
            except _UNAVAILABLE_ERRORS as exc:
                failures.append(exc)
                tg.cancel_scope.cancel()
            finally:
                self._window.release()

        # Each publish waits for its own confirm while later ones go out. A task's first
        # step takes the channel's (FIFO) lock, so tasks started in order publish in order.
        async with anyio.create_task_group() as tg:
            for index, body in enumerate(bodies):
                await self._window.acquire()
                tg.start_soon(publish_one, index, body)
        if failures:
            raise BrokerUnavailable(
                f"publishing failed, {sum(confirmed)} of {len(bodies)} confirmed: {failures[0]!r}"
            ) from failures[0]
        return confirmed

    @asynccontextmanager
    async def consume(self, *, prefetch: int) -> AsyncGenerator[AsyncIterator[Delivery], None]:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        with (
            _unavailable_on_error("cannot open a consumer channel"),
            anyio.fail_after(_RPC_TIMEOUT),
        ):
            channel = await self._open_channel()
        send, receive = anyio.create_memory_object_stream[AmqpDelivery](max_buffer_size=prefetch)
        consumer = _Consumer(channel, send)
        try:
            closing = cast("asyncio.Future[Any]", channel.closing)  # pyright: ignore[reportUnknownMemberType]
            closing.add_done_callback(consumer.on_channel_closed)
            channel.on_consumer_cancel_callbacks.add(consumer.on_cancelled)
            with _unavailable_on_error("cannot start consuming"), anyio.fail_after(_RPC_TIMEOUT):
                await channel.basic_qos(prefetch_count=prefetch)
                await channel.basic_consume(self.queue_name, consumer.on_message)
            yield _Deliveries(consumer, receive)
        finally:
            consumer.stopping = True
            send.close()
            receive.close()
            # Closing the channel cancels the consumer and requeues what it left unsettled.
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True), suppress(*_UNAVAILABLE_ERRORS):
                await channel.close(None)

    async def _control(self) -> AbstractChannel:
        # A failed passive declare (queue deleted) closes the channel: open a fresh one.
        async with self._control_lock:
            if self._control_channel.is_closed:
                self._control_channel = await self._open_channel()
            return self._control_channel

    async def _open_channel(self) -> AbstractChannel:
        # aiormq raises a bare RuntimeError for a closed connection.
        if self._connection.is_closed:
            raise BrokerUnavailable("the connection to RabbitMQ is closed")
        return await self._connection.channel(publisher_confirms=False)


@asynccontextmanager
async def open_amqp_broker(url: str, *, prefix: str) -> AsyncGenerator[AmqpBroker, None]:
    """A connected ``AmqpBroker`` for ``url`` with its layout declared, closed on exit."""
    layout = AmqpLayout.for_prefix(prefix)
    where = URL(url).with_password(None)
    with _unavailable_on_error(f"cannot connect to {where}"), anyio.fail_after(_CONNECT_TIMEOUT):
        connection = await aiormq.connect(url)
    try:
        with _unavailable_on_error(f"cannot set up {where}"), anyio.fail_after(_RPC_TIMEOUT):
            control_channel = await connection.channel(publisher_confirms=False)
            await declare_layout(control_channel, layout)
            publish_channel = await connection.channel(publisher_confirms=True)
        yield AmqpBroker(
            connection,
            control_channel=control_channel,
            publish_channel=publish_channel,
            layout=layout,
        )
    finally:
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True), suppress(*_UNAVAILABLE_ERRORS):
            await connection.close(None)

"""The AMQP broker: ``Broker`` over RabbitMQ, with aiormq (asyncio only).

Layout, every name under the key prefix (``AmqpLayout``):

- exchange ``tasks`` (direct, durable), the one dispatch messages are published to;
- queue ``tasks_queue`` (durable quorum queue with a delivery limit), bound to it with
  ``ROUTING_KEY``, the key ``publish`` uses for the default taskq queue, and
  dead-lettering to
- exchange ``tasks.dead`` (fanout, durable), which feeds the durable queue ``tasks_dead``
  (a quorum queue too, unless an older taskq declared it as a classic one);
- for each other taskq queue ``q`` (a worker pool), a queue ``tasks_queue.q`` like
  ``tasks_queue``, bound with ``task.dispatch.q``. It is declared by the first publish
  to it on a connection (so a message waits there before any consumer serves ``q``)
  and by each consumer of it.

Messages are persistent JSON, published ``mandatory`` with publisher confirms and a window
of outstanding confirms.

aiormq does not reconnect by itself, so the broker keeps its connection alive: when it is
lost, a background task reconnects with backoff and declares the layout again, trying
every node of a cluster in turn (``NodeRotation``) when ``AMQP_URL`` lists several. Meanwhile
``ping`` and ``publish`` raise ``BrokerUnavailable`` (callers retry: scheduler claims stay
leased), and consumers wait, then consume again on a fresh channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, cast

import aiormq
import anyio
import anyio.lowlevel
import msgspec
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pamqp import commands as spec
from yarl import URL

from app.adapters.amqp_nodes import NodeRotation, node_name
from app.config import parse_amqp_urls
from app.ports import (
    DEFAULT_QUEUE,
    DELIVERY_LIMIT,
    BrokerUnavailable,
    Delivery,
    Dispatch,
    QueueStats,
    decode_dispatch,
)

ROUTING_KEY = "task.dispatch"
"""The routing key ``tasks_queue`` is bound with, that of the default taskq queue."""

PUBLISH_WINDOW = 100
"""Publishes awaiting their confirm at once, per broker (one at a time caps throughput)."""

CONTENT_TYPE = "application/json"
PERSISTENT = 2

_CONNECT_TIMEOUT = 15.0  # delete_amqp_layout's; the broker's own: NodeRotation.connect_timeout
_RPC_TIMEOUT = 10.0
_CONFIRM_TIMEOUT = 30.0
_CLOSE_TIMEOUT = 5.0
_RETRY_FIRST = 0.1
_RETRY_MAX = 5.0
_HEARTBEAT_SECONDS = 10
# How long a process that may start without RabbitMQ waits for its first attempt.
_FIRST_ATTEMPT_SECONDS = 5.0

log = logging.getLogger(__name__)

# What aiormq raises when the connection or a channel is gone or does not answer
# (TimeoutError and ConnectionError are OSErrors; ChannelInvalidStateError is a RuntimeError).
_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    aiormq.AMQPError,
    aiormq.ChannelInvalidStateError,
    OSError,
)


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

    def queue_for(self, taskq_queue: str) -> str:
        """The RabbitMQ queue of a taskq queue (the default one keeps ``tasks_queue``)."""
        return self.queue if taskq_queue == DEFAULT_QUEUE else f"{self.queue}.{taskq_queue}"

    @staticmethod
    def routing_key_for(taskq_queue: str) -> str:
        """The routing key of a taskq queue (the default one keeps ``ROUTING_KEY``)."""
        return ROUTING_KEY if taskq_queue == DEFAULT_QUEUE else f"{ROUTING_KEY}.{taskq_queue}"


async def declare_layout(channel: AbstractChannel, layout: AmqpLayout) -> None:
    """Declare the exchanges, queues and bindings of ``layout`` (idempotent)."""
    await channel.exchange_declare(
        layout.dead_letter_exchange, exchange_type="fanout", durable=True
    )
    await _declare_dead_letter_queue(channel.connection, layout.dead_letter_queue)
    await channel.queue_bind(layout.dead_letter_queue, layout.dead_letter_exchange)
    await channel.exchange_declare(layout.exchange, exchange_type="direct", durable=True)
    await declare_queue(channel, layout, DEFAULT_QUEUE)


async def declare_queue(channel: AbstractChannel, layout: AmqpLayout, taskq_queue: str) -> None:
    """Declare the quorum queue of a taskq queue and bind it (idempotent; the exchanges
    of ``layout`` must exist)."""
    queue = layout.queue_for(taskq_queue)
    await channel.queue_declare(
        queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": layout.dead_letter_exchange,
        },
    )
    await channel.queue_bind(queue, layout.exchange, layout.routing_key_for(taskq_queue))


async def _declare_dead_letter_queue(connection: AbstractConnection, name: str) -> None:
    """Declare the dead-letter queue as a quorum queue, replicated like ``tasks_queue``.

    An older taskq declared it as a classic queue, whose type cannot change in place
    (RabbitMQ refuses the declare: PRECONDITION_FAILED): then that queue is used as it
    is, with a warning, so that an upgrade goes on working. Being classic, it lives on
    one node, and while that node is down, declaring it fails (NOT_FOUND) and so does
    connecting: the README says how to move it to a quorum queue. A refused declare
    closes its channel: hence one of its own.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    except aiormq.ChannelPreconditionFailed:
        log.warning(
            "dead-letter queue %s is a classic queue (declared by an older taskq), not"
            " replicated: see the README's 'Replicated RabbitMQ' to make it a quorum queue",
            name,
        )
    finally:
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True), suppress(*_UNAVAILABLE_ERRORS):
            await channel.close(None)


async def delete_amqp_layout(url: str, *, prefix: str, queues: Iterable[str] = ()) -> None:
    """Delete every exchange and queue of ``prefix``, messages included (tests, tenant
    removal), with the RabbitMQ queues of the taskq ``queues`` named (AMQP cannot list
    them: ``QueueDirectory.queues_in_use`` can)."""
    layout = AmqpLayout.for_prefix(prefix)
    with _unavailable_on_error("cannot delete the AMQP layout"):
        with anyio.fail_after(_CONNECT_TIMEOUT + _RPC_TIMEOUT):
            connection = await aiormq.connect(url)
            try:
                channel = await connection.channel(publisher_confirms=False)
                extra = sorted({layout.queue_for(q) for q in queues} - {layout.queue})
                for queue in (layout.queue, *extra, layout.dead_letter_queue):
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

    @property
    def stale(self) -> bool:
        """Its channel is gone: RabbitMQ has given the message back to the queue."""
        return self._consumer.stopping or self._consumer.lost is not None

    async def ack(self) -> None:
        await self._settle(self._consumer.settlements.ack)

    async def requeue(self) -> None:
        await self._settle(self._consumer.settlements.requeue)

    async def dead_letter(self) -> None:
        await self._settle(self._consumer.settlements.dead_letter)

    async def _settle(self, settle: Callable[[int], Awaitable[None]]) -> None:
        if self._settled or self.stale:
            # As with the memory broker: settling twice, or after the channel went (the
            # message is back in the queue, for a redelivery), does nothing.
            await anyio.lowlevel.checkpoint()
            return
        self._settled = True
        await settle(self.delivery_tag)


ACK_LINGER = 0.02
"""Seconds an ack waits for others of its channel, to go out with them as one frame."""


class _Settlements:
    """Settles the deliveries of one channel, coalescing acknowledgements.

    On a quorum queue every settlement frame is a command RabbitMQ replicates, and each
    one frees a single message of the prefetch for the next delivery; a consumer's runs
    start one by one, so acks written as asked for make RabbitMQ settle and deliver one
    message at a time. So an ack is written up to ``ACK_LINGER`` later, with those asked
    for meanwhile: the oldest deliveries still unsettled as one ``basic_ack(tag,
    multiple=True)``, and those past a gap (an older delivery still unsettled, or being
    requeued or rejected) one by one, since ``multiple`` would settle the gap too. Acks
    for half the prefetch go at once, so that lingering acks never hold up more than half
    of what RabbitMQ may deliver. ``tests.bench.ack_linger``: RabbitMQ's CPU a message
    0.47x and the consumer's 0.80x with a 20 ms linger, against one frame each.

    ``ack`` returns once the ack is due to be written. It promises what a written frame
    promised before: if the channel is lost first, RabbitMQ gives the message back to the
    queue, and its redelivery finds the run started and is skipped. Closing the channel
    (``close``) writes the acks still lingering first.
    """

    def __init__(self, channel: AbstractChannel, prefetch: int, tasks: TaskGroup) -> None:
        self._channel = channel
        self._tasks = tasks
        self._at_once = max(1, prefetch // 2)
        self._unsettled: dict[int, None] = {}  # tags not settled on the wire, oldest first
        self._wanted: set[int] = set()  # tags to ack with the next write
        self._enough = anyio.Event()  # set when the wanted acks should not wait longer
        self._flushing = False

    def delivered(self, tag: int) -> None:
        self._unsettled[tag] = None

    async def ack(self, tag: int) -> None:
        self._wanted.add(tag)
        if len(self._wanted) >= self._at_once:
            self._enough.set()
        if not self._flushing:
            self._flushing = True
            self._tasks.start_soon(self._flush)
        await anyio.lowlevel.checkpoint()

    async def requeue(self, tag: int) -> None:
        await self._alone("requeue", tag, self._channel.basic_nack(tag, requeue=True))

    async def dead_letter(self, tag: int) -> None:
        await self._alone("dead-letter", tag, self._channel.basic_reject(tag, requeue=False))

    async def close(self) -> None:
        """Write the acks still lingering now (before the channel closes)."""
        self._enough.set()
        await self._write_acks()

    async def _alone(self, what: str, tag: int, settling: Awaitable[None]) -> None:
        """Settle ``tag`` with a frame of its own; until it is written, no ``multiple``
        ack passes it."""
        with _unavailable_on_error(f"cannot {what} delivery {tag}"):
            await settling
        del self._unsettled[tag]

    async def _flush(self) -> None:
        """Write the wanted acks once they lingered, until none are left."""
        try:
            while self._wanted:
                with anyio.move_on_after(ACK_LINGER):
                    await self._enough.wait()
                self._enough = anyio.Event()
                await self._write_acks()
        finally:
            self._flushing = False

    async def _write_acks(self) -> None:
        tags, self._wanted = self._wanted, set()
        if not tags:
            return
        try:
            # Shielded: these acks were promised to callers that went on.
            with (
                _unavailable_on_error("cannot ack deliveries"),
                anyio.fail_after(_RPC_TIMEOUT, shield=True),
            ):
                for tag, multiple in self._frames(tags):
                    # Handed to the connection's writer, not awaited until written: its
                    # drain cost a consumer 9 % of its CPU a run.
                    await self._channel.basic_ack(tag, multiple=multiple, wait=False)
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning(
                "could not ack %d deliveries (%s); their redeliveries will be skipped",
                len(tags),
                exc,
            )
        else:
            for tag in tags:
                del self._unsettled[tag]

    def _frames(self, tags: set[int]) -> list[tuple[int, bool]]:
        """The (tag, multiple) acks that settle exactly ``tags``."""
        oldest = covered = 0
        for tag in self._unsettled:
            if tag not in tags:
                break
            oldest, covered = tag, covered + 1
        frames = [(oldest, covered > 1)] if covered else []
        frames.extend((tag, False) for tag in sorted(tags) if tag > oldest)
        return frames


class _Consumer:
    """One ``basic_consume`` on its own channel, feeding a bounded stream."""

    def __init__(
        self,
        channel: AbstractChannel,
        send: MemoryObjectSendStream[AmqpDelivery],
        *,
        prefetch: int,
        tasks: TaskGroup,
    ) -> None:
        self.channel = channel
        self.settlements = _Settlements(channel, prefetch, tasks)
        self.stopping = False
        self.lost: str | None = None
        self._send = send

    async def on_message(self, message: DeliveredMessage) -> None:
        delivery = AmqpDelivery(self, message)
        self.settlements.delivered(delivery.delivery_tag)
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

    async def close(self) -> None:
        """Stop consuming, once the lingering acks are written; what was left unsettled
        goes back to the queue."""
        self.stopping = True
        self._send.close()
        with anyio.CancelScope(shield=True):
            await self.settlements.close()
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True), suppress(*_UNAVAILABLE_ERRORS):
            await self.channel.close(None)


class _Deliveries:
    """The async iterator ``AmqpBroker.consume`` yields: it consumes again on a fresh
    channel whenever the current one is lost (connection lost, queue deleted)."""

    def __init__(
        self,
        broker: AmqpBroker,
        queue: str,
        prefetch: int,
        taskq_queue: str | None,
        tasks: TaskGroup,
    ) -> None:
        self._broker = broker
        self._tasks = tasks
        self._queue = queue
        self._prefetch = prefetch
        self._taskq_queue = taskq_queue
        self._consumer: _Consumer | None = None
        self._receive: MemoryObjectReceiveStream[AmqpDelivery] | None = None

    def __aiter__(self) -> _Deliveries:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            if self._consumer is None or self._receive is None:
                await self.start()
                assert self._receive is not None
            try:
                delivery = await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                assert self._consumer is not None
                log.warning("consuming again after: %s", self._consumer.lost or "channel closed")
                await self.stop()
                continue
            if not delivery.stale:
                return delivery

    async def start(self) -> None:
        """Consume on a fresh channel, waiting for the connection as long as it takes."""
        delay = _RETRY_FIRST
        while True:
            connection = await self._broker.connected()
            try:
                with anyio.fail_after(_RPC_TIMEOUT):
                    channel = await connection.channel(publisher_confirms=False)
                    # Declaring again heals a queue deleted under a running consumer.
                    await declare_layout(channel, self._broker.layout)
                    if self._taskq_queue is not None:
                        await declare_queue(channel, self._broker.layout, self._taskq_queue)
                    await channel.basic_qos(prefetch_count=self._prefetch)
                    send, receive = anyio.create_memory_object_stream[AmqpDelivery](
                        max_buffer_size=self._prefetch
                    )
                    consumer = _Consumer(channel, send, prefetch=self._prefetch, tasks=self._tasks)
                    closing = cast("asyncio.Future[Any]", channel.closing)  # pyright: ignore[reportUnknownMemberType]
                    closing.add_done_callback(consumer.on_channel_closed)
                    channel.on_consumer_cancel_callbacks.add(consumer.on_cancelled)
                    await channel.basic_consume(self._queue, consumer.on_message)
            except (*_UNAVAILABLE_ERRORS, TimeoutError) as exc:
                log.warning("cannot consume yet (%r); retrying in %.1f s", exc, delay)
                await anyio.sleep(delay)
                delay = min(2 * delay, _RETRY_MAX)
                continue
            self._consumer, self._receive = consumer, receive
            return

    async def stop(self) -> None:
        consumer, receive = self._consumer, self._receive
        self._consumer = self._receive = None
        if receive is not None:
            receive.close()
        if consumer is not None:
            await consumer.close()


class _Link:
    """One live connection and the channels the broker keeps open on it."""

    def __init__(
        self,
        url: str,
        connection: AbstractConnection,
        control_channel: AbstractChannel,
        publish_channel: AbstractChannel,
    ) -> None:
        self.connection = connection
        self.control_channel = control_channel
        self.publish_channel = publish_channel
        self.node = node_name(url)
        """The node connected to, as ``/health`` names it."""
        self.url = url
        # Taskq queues declared on this connection (the default one with the layout).
        self.declared: set[str] = {DEFAULT_QUEUE}
        self.closed = anyio.Event()
        closing = cast("asyncio.Future[Any]", connection.closing)  # pyright: ignore[reportUnknownMemberType]
        closing.add_done_callback(lambda _: self.closed.set())

    @property
    def usable(self) -> bool:
        return not self.connection.is_closed and not self.closed.is_set()


class AmqpBroker:
    """Implements ``Broker`` over RabbitMQ; open it with ``open_amqp_broker``."""

    def __init__(self, urls: Sequence[str], layout: AmqpLayout) -> None:
        self._nodes = NodeRotation(urls)
        self._where = self._nodes.describe()
        self.layout = layout
        self._link: _Link | None = None
        self._link_changed = anyio.Event()
        self._control_lock = anyio.Lock()
        self._window = anyio.Semaphore(PUBLISH_WINDOW)
        # Why the last attempt to connect failed, while there is no connection.
        self._connect_error: BrokerUnavailable | None = None

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

    async def connect(self) -> None:
        """Connect and declare the layout; raises ``BrokerUnavailable`` if it cannot."""
        self._set_link(await self._connect())

    async def try_connect(self, within: float) -> None:
        """One attempt to connect, given at most ``within`` s; if it fails, the reason
        is kept for ``BrokerUnavailable`` and ``keep_connected`` goes on trying."""
        with anyio.move_on_after(within):
            try:
                await self.connect()
            except BrokerUnavailable as exc:
                self._connect_error = exc

    async def keep_connected(self) -> None:
        """Connect whenever there is no connection (lost, or not made yet by
        ``connect()``), with backoff, until cancelled."""
        link = self._link
        while True:
            if link is not None:
                await link.closed.wait()
                self._set_link(None)
                # The others first: the node may be down for a while.
                self._nodes.failed(link.url)
                log.warning("lost the connection to %s; reconnecting", link.node)
            delay = _RETRY_FIRST
            while True:
                try:
                    link = await self._connect()
                    break
                except BrokerUnavailable as exc:
                    self._connect_error = exc
                    log.warning("%s; retrying in %.1f s", exc, delay)
                    await anyio.sleep(delay)
                    delay = min(2 * delay, _RETRY_MAX)
            self._connect_error = None
            self._set_link(link)
            log.warning("connected to %s", link.node)

    async def _connect(self) -> _Link:
        """A link to the first node that answers, in the rotation's order."""
        failures: list[BrokerUnavailable] = []
        for url in self._nodes.order():
            try:
                return await self._connect_to(url)
            except BrokerUnavailable as exc:
                self._nodes.failed(url)
                failures.append(exc)
        if len(failures) == 1:
            raise failures[0]
        raise BrokerUnavailable(
            f"cannot connect to {self._where}: " + "; ".join(map(str, failures))
        ) from failures[-1]

    async def _connect_to(self, url: str) -> _Link:
        where = node_name(url)
        with (
            _unavailable_on_error(f"cannot connect to {where}"),
            anyio.fail_after(self._nodes.connect_timeout),
        ):
            connection = await aiormq.connect(url)
        try:
            with (
                _unavailable_on_error(f"cannot set up {where}"),
                anyio.fail_after(_RPC_TIMEOUT),
            ):
                control_channel = await connection.channel(publisher_confirms=False)
                await declare_layout(control_channel, self.layout)
                publish_channel = await connection.channel(publisher_confirms=True)
        except BaseException:
            await _close_connection(connection)
            raise
        return _Link(url, connection, control_channel, publish_channel)

    def _set_link(self, link: _Link | None) -> None:
        self._link = link
        self._link_changed.set()
        self._link_changed = anyio.Event()

    def _current(self, what: str) -> _Link:
        link = self._link
        if link is None or not link.usable:
            error = self._connect_error
            why = "" if error is None else f"; the last attempt: {error}"
            raise BrokerUnavailable(
                f"{what}: not connected to {self._where} (reconnecting{why})"
            ) from error
        return link

    async def connected(self) -> AbstractConnection:
        """The live connection, once there is one (waits through an outage)."""
        while self._link is None or not self._link.usable:
            await self._link_changed.wait()
        return self._link.connection

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await _close_connection(link.connection)

    async def ping(self) -> str:
        """Raise unless RabbitMQ answers; which node answered."""
        node = self._current("RabbitMQ did not answer").node
        await self.queue_depth()
        return f"connected to {node}"

    async def queue_depth(self) -> int:
        link = self._current("RabbitMQ did not answer")
        with _unavailable_on_error("RabbitMQ did not answer"), anyio.fail_after(_RPC_TIMEOUT):
            async with self._control_lock:
                channel = await self._control_channel(link)
                declared = await channel.queue_declare(self.queue_name, passive=True)
        return declared.message_count or 0

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        link = self._current("RabbitMQ did not answer")
        stats: list[QueueStats] = []
        with _unavailable_on_error("RabbitMQ did not answer"), anyio.fail_after(_RPC_TIMEOUT):
            async with self._control_lock:
                for queue in queues:
                    channel = await self._control_channel(link)
                    try:
                        declared = await channel.queue_declare(
                            self.layout.queue_for(queue), passive=True
                        )
                    except aiormq.ChannelNotFoundEntity:
                        stats.append(QueueStats(queue, 0, 0))  # not declared yet
                        continue
                    depth, consumers = declared.message_count, declared.consumer_count
                    stats.append(QueueStats(queue, depth or 0, consumers or 0))
        return stats

    @staticmethod
    async def _control_channel(link: _Link) -> AbstractChannel:
        """The control channel, open again if a failed passive declare (a queue deleted
        or not declared yet) closed it; call with the control lock held."""
        if link.control_channel.is_closed:
            link.control_channel = await link.connection.channel(publisher_confirms=False)
        return link.control_channel

    async def publish(self, messages: Sequence[Dispatch]) -> list[Dispatch]:
        await self._declare_queues({message.queue for message in messages})
        confirmed = await self._publish_bodies(
            [(msgspec.json.encode(m), self.layout.routing_key_for(m.queue)) for m in messages]
        )
        unroutable = {m.queue for m, ok in zip(messages, confirmed, strict=True) if not ok}
        if unroutable and (link := self._link) is not None:
            # Returned (its queue deleted meanwhile?): declare it again before the resend.
            link.declared -= unroutable - {DEFAULT_QUEUE}
        return [message for message, ok in zip(messages, confirmed, strict=True) if ok]

    async def _declare_queues(self, queues: set[str]) -> None:
        """Declare the taskq queues not declared on this connection yet, so that a
        message routed to one waits there even if no consumer serves it yet."""
        link = self._current("cannot publish")
        if not (missing := queues - link.declared):
            return
        with _unavailable_on_error("cannot declare a queue"), anyio.fail_after(_RPC_TIMEOUT):
            async with self._control_lock:
                channel = await self._control_channel(link)
                for queue in sorted(missing):
                    await declare_queue(channel, self.layout, queue)
                    link.declared.add(queue)

    async def _publish_bodies(self, bodies: Sequence[tuple[bytes, str]]) -> list[bool]:
        # aiormq's own Channel: its basic_publish takes ``wait``, AbstractChannel's lacks it.
        channel = cast(aiormq.Channel, self._current("cannot publish").publish_channel)
        if channel.is_closed:
            raise BrokerUnavailable("cannot publish: the publishing channel is closed")
        confirmed = [False] * len(bodies)
        failures: list[Exception] = []

        async def publish_one(index: int, body: bytes, routing_key: str) -> None:
            try:
                with anyio.fail_after(_CONFIRM_TIMEOUT):
                    await channel.basic_publish(
                        body,
                        exchange=self.exchange,
                        routing_key=routing_key,
                        properties=_properties(),
                        mandatory=True,
                        # Not waiting for the writer to drain each message (aiormq's
                        # default): the window bounds what is queued, and the confirm
                        # is what counts. Scheduler CPU a dispatch 0.80x
                        # (``tests.bench.dispatch_cost``).
                        wait=False,
                    )
                confirmed[index] = True
            except aiormq.DeliveryError:
                pass  # nacked, or returned as unroutable (a PublishError): not confirmed
            except (*_UNAVAILABLE_ERRORS, TimeoutError) as exc:
                failures.append(exc)
                tg.cancel_scope.cancel()
            finally:
                self._window.release()

        # Each publish waits for its own confirm while later ones go out, at most
        # ``PUBLISH_WINDOW`` at once: as many publishers, each taking the next message once
        # the window has room (a task a publisher, not a task a message: a batch of 500
        # spawned 500). Taking the next message and handing it to the channel's writer
        # happen without a pause in between, so messages go out in order.
        left = iter(enumerate(bodies))

        async def publisher() -> None:
            while True:
                await self._window.acquire()
                if (following := next(left, None)) is None:
                    self._window.release()
                    return
                index, (body, routing_key) = following
                await publish_one(index, body, routing_key)

        async with anyio.create_task_group() as tg:
            for _ in range(min(len(bodies), PUBLISH_WINDOW)):
                tg.start_soon(publisher)
        if failures:
            raise BrokerUnavailable(
                f"publishing failed, {sum(confirmed)} of {len(bodies)} confirmed: {failures[0]!r}"
            ) from failures[0]
        return confirmed

    def consume(
        self, *, prefetch: int, queue: str = DEFAULT_QUEUE
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        return self._consuming(self.layout.queue_for(queue), prefetch, queue)

    def consume_dead_letters(
        self, *, prefetch: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        return self._consuming(self.dead_letter_queue, prefetch, None)

    @asynccontextmanager
    async def _consuming(
        self, queue: str, prefetch: int, taskq_queue: str | None
    ) -> AsyncGenerator[AsyncIterator[Delivery], None]:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        async with anyio.create_task_group() as tasks:  # the acks' writers
            deliveries = _Deliveries(self, queue, prefetch, taskq_queue, tasks)
            try:
                await deliveries.start()
                yield deliveries
            finally:
                with anyio.CancelScope(shield=True):
                    await deliveries.stop()  # writes the lingering acks
                tasks.cancel_scope.cancel()


async def _close_connection(connection: AbstractConnection) -> None:
    with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True), suppress(*_UNAVAILABLE_ERRORS):
        await connection.close(None)


def _with_heartbeat(url: str) -> str:
    """Notice a dead connection within seconds, not the minutes of the default heartbeat."""
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=_HEARTBEAT_SECONDS))


@asynccontextmanager
async def open_amqp_broker(
    url: str, *, prefix: str, require_connection: bool = True
) -> AsyncGenerator[AmqpBroker, None]:
    """A connected ``AmqpBroker`` for ``url`` with its layout declared, closed on exit.

    ``url`` may list several nodes of a cluster, comma-separated: the broker connects to
    one that answers and, when that one is lost, to another (``NodeRotation``).

    The first connection must succeed (a wrong URL fails at once); later losses are
    healed in the background. Without ``require_connection``, a first attempt that fails
    (or takes over a few seconds) is carried on in the background: the broker opens
    while RabbitMQ is down, and raises ``BrokerUnavailable`` (naming why) until it is up.
    """
    nodes = [_with_heartbeat(node) for node in parse_amqp_urls(url)]
    broker = AmqpBroker(nodes, AmqpLayout.for_prefix(prefix))
    if require_connection:
        await broker.connect()
    else:
        await broker.try_connect(within=_FIRST_ATTEMPT_SECONDS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.keep_connected)
        try:
            yield broker
        finally:
            tg.cancel_scope.cancel()
            await broker.close()

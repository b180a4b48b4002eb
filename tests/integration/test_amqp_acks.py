"""The AMQP broker coalesces the acks of one channel: an ack waits up to ``ACK_LINGER``
for others, and those asked for meanwhile go out as one ``basic_ack(multiple=True)``
frame where they are the oldest unsettled deliveries (the broker contract checks that
nothing else is settled by it). Acks for half the prefetch do not wait, and leaving the
consumer writes those still waiting."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from app.adapters import amqp_broker
from app.adapters.amqp_broker import AmqpBroker, AmqpDelivery, delete_amqp_layout, open_amqp_broker
from tests.conftest import AMQP_URL, eventually
from tests.contract.test_broker_contract import WAIT, assert_nothing_arrives, dispatches, receive

Frames = list[tuple[int, bool]]


@pytest.fixture
async def broker(prefix: str) -> AsyncGenerator[AmqpBroker, None]:
    try:
        async with open_amqp_broker(AMQP_URL, prefix=prefix) as amqp:
            yield amqp
    finally:
        with anyio.CancelScope(shield=True):
            await delete_amqp_layout(AMQP_URL, prefix=prefix)


@asynccontextmanager
async def consuming(
    broker: AmqpBroker, count: int, monkeypatch: pytest.MonkeyPatch, *, prefetch: int = 0
) -> AsyncIterator[tuple[list[AmqpDelivery], Frames]]:
    """``count`` published and received (prefetch ``count`` unless given), and the ack
    frames their channel writes from then on: (delivery tag, multiple)."""
    with anyio.fail_after(WAIT):
        await broker.publish(dispatches(count))
    async with broker.consume(prefetch=prefetch or count) as deliveries:
        received = [d for d in await receive(deliveries, count) if isinstance(d, AmqpDelivery)]
        assert len(received) == count
        channel = received[0]._consumer.channel  # pyright: ignore[reportPrivateUsage]
        frames: Frames = []
        write_ack = channel.basic_ack

        async def written(tag: int, multiple: bool = False, **options: Any) -> None:
            frames.append((tag, multiple))
            await write_ack(tag, multiple=multiple, **options)

        monkeypatch.setattr(channel, "basic_ack", written)
        yield received, frames


def acked(frames: Frames, received: list[AmqpDelivery]) -> set[int]:
    """The delivery tags ``frames`` settle (a ``multiple`` frame: every tag up to it)."""
    tags = {delivery.delivery_tag for delivery in received}
    settled: set[int] = set()
    for tag, multiple in frames:
        settled |= {t for t in tags if t <= tag} if multiple else {tag}
    return settled


async def test_acks_asked_for_together_go_out_in_fewer_frames(
    broker: AmqpBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 8
    async with consuming(broker, count, monkeypatch) as (received, frames):
        async with anyio.create_task_group() as tg:
            for delivery in received:
                tg.start_soon(delivery.ack)
        await eventually(lambda: len(acked(frames, received)) == count, within=WAIT)
        assert len(frames) < count, frames
        assert any(multiple for _, multiple in frames), frames
    async with broker.consume(prefetch=count) as deliveries:
        await assert_nothing_arrives(deliveries)


async def test_an_ack_waits_for_others_then_goes_out_alone(
    broker: AmqpBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp_broker, "ACK_LINGER", 0.3)
    async with consuming(broker, 4, monkeypatch) as (received, frames):
        with anyio.fail_after(WAIT):
            await received[1].ack()
        assert frames == []  # returned at once: the frame waits for others
        await eventually(lambda: frames != [], within=WAIT)
        assert frames == [(received[1].delivery_tag, False)]  # past an unsettled delivery
        for delivery in (received[0], received[2], received[3]):
            await delivery.requeue()
    async with broker.consume(prefetch=4) as deliveries:
        again = await receive(deliveries, 3)
        assert {d.dispatch for d in again} == {received[n].dispatch for n in (0, 2, 3)}
        await assert_nothing_arrives(deliveries)


async def test_acks_for_half_the_prefetch_go_at_once(
    broker: AmqpBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp_broker, "ACK_LINGER", 3600)  # only the count can send them
    async with consuming(broker, 8, monkeypatch) as (received, frames):
        for delivery in received[:3]:
            await delivery.ack()
        assert frames == []
        await received[3].ack()
        await eventually(lambda: frames != [], within=WAIT)
        assert frames == [(received[3].delivery_tag, True)]  # the four oldest, one frame


async def test_leaving_the_consumer_writes_the_acks_still_waiting(
    broker: AmqpBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp_broker, "ACK_LINGER", 3600)
    async with consuming(broker, 3, monkeypatch, prefetch=8) as (received, frames):
        await received[0].ack()
        await received[2].ack()
        assert frames == []
    assert sorted(frames) == [(received[0].delivery_tag, False), (received[2].delivery_tag, False)]
    async with broker.consume(prefetch=3) as deliveries:
        (again,) = await receive(deliveries, 1)
        assert again.dispatch == received[1].dispatch  # unsettled, so given back
        await assert_nothing_arrives(deliveries)

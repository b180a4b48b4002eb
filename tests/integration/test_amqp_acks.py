"""The AMQP broker coalesces the acks of one channel: acks asked for together go out
as one ``basic_ack(multiple=True)`` frame where they are the oldest unsettled deliveries
(the broker contract checks that nothing else is settled by it)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio
import pytest

from app.adapters.amqp_broker import AmqpBroker, AmqpDelivery, delete_amqp_layout, open_amqp_broker
from tests.conftest import AMQP_URL
from tests.contract.test_broker_contract import WAIT, assert_nothing_arrives, dispatches, receive


@pytest.fixture
async def broker(prefix: str) -> AsyncGenerator[AmqpBroker, None]:
    try:
        async with open_amqp_broker(AMQP_URL, prefix=prefix) as amqp:
            yield amqp
    finally:
        with anyio.CancelScope(shield=True):
            await delete_amqp_layout(AMQP_URL, prefix=prefix)


async def test_acks_asked_for_together_go_out_in_fewer_frames(
    broker: AmqpBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 8
    with anyio.fail_after(WAIT):
        await broker.publish(dispatches(count))
    async with broker.consume(prefetch=count) as deliveries:
        received = await receive(deliveries, count)
        first = received[0]
        assert isinstance(first, AmqpDelivery)
        channel = first._consumer.channel  # pyright: ignore[reportPrivateUsage]
        frames: list[tuple[int, bool]] = []
        write_ack = channel.basic_ack

        async def written(tag: int, multiple: bool = False, **options: Any) -> None:
            frames.append((tag, multiple))
            await write_ack(tag, multiple=multiple, **options)

        monkeypatch.setattr(channel, "basic_ack", written)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for delivery in received:
                    tg.start_soon(delivery.ack)
        assert 1 <= len(frames) < count, frames
        assert any(multiple for _, multiple in frames), frames
    async with broker.consume(prefetch=count) as deliveries:
        await assert_nothing_arrives(deliveries)

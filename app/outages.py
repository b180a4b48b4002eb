"""Waiting out an outage of the store or the broker instead of giving up."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from app.ports import BrokerUnavailable, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

OUTAGES = (StoreUnavailable, BrokerUnavailable)
FIRST_DELAY = 0.1
MAX_DELAY = 5.0


class Backoff:
    """Exponential delays between attempts, reset by a success."""

    def __init__(self, first: float = FIRST_DELAY, most: float = MAX_DELAY) -> None:
        self._first = first
        self._most = most
        self.delay = first

    async def wait(self, what: str, error: BaseException) -> None:
        log.warning("%s: %s; trying again in %.1f s", what, error, self.delay)
        await anyio.sleep(self.delay)
        self.delay = min(2 * self.delay, self._most)

    def reset(self) -> None:
        self.delay = self._first


async def until_available(operation: Callable[[], Awaitable[T]], what: str) -> T:
    """Run ``operation`` until the store and broker let it succeed (cancellable)."""
    backoff = Backoff()
    while True:
        try:
            return await operation()
        except OUTAGES as exc:
            await backoff.wait(f"cannot {what}", exc)


async def settle(settling: Callable[[], Awaitable[None]]) -> None:
    """Settle a delivery (``delivery.ack`` ...); if the broker went away meanwhile,
    RabbitMQ has requeued the message, and its redelivery finds the run no longer queued
    and is skipped."""
    try:
        await settling()
    except BrokerUnavailable as exc:
        log.warning("could not settle a delivery (%s); its redelivery will be skipped", exc)

"""Waiting out an outage of the store or the broker instead of giving up."""

from __future__ import annotations

import logging
import math
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


def describe(error: BaseException) -> str:
    """``error`` for a person: its message, named by its root cause (what the system
    said, such as ``ConnectionRefusedError``) rather than by the wrappers around it."""
    cause = error
    while (inner := cause.__cause__ or cause.__context__) is not None:
        cause = inner
    return f"{type(cause).__name__}: {error}"


async def probe(check: Callable[[], Awaitable[object]], *, within: float) -> str | None:
    """Run ``check`` for at most ``within`` seconds: ``None`` if it succeeded, else
    what went wrong (``describe``), or that it did not answer in time."""
    try:
        with anyio.move_on_after(within) as deadline:
            await check()
    except Exception as exc:
        return describe(exc)
    return f"no answer within {within:g} s" if deadline.cancelled_caught else None


class DependencyDown(Exception):
    """Refused without trying: the dependency is known to be down (``OutageGate``)."""

    def __init__(self, outage: str, *, retry_after: int) -> None:
        super().__init__(outage)
        self.retry_after = retry_after


class OutageGate:
    """Fails fast while a dependency is known to be down, instead of every caller
    waiting out the client's retries on its own.

    ``trip`` (an operation found the dependency out of reach) closes the gate; while it
    is closed, ``admit`` raises ``DependencyDown`` at once, except that every
    ``probe_every`` seconds the dependency is probed (``check``, within
    ``probe_budget``): callers arriving meanwhile wait for that probe's verdict, and if
    the dependency answers, the gate opens for everyone. A health check run through
    ``check_now`` moves the gate too, so that it never disagrees with ``/health``.
    """

    def __init__(
        self,
        check: Callable[[], Awaitable[object]],
        *,
        probe_every: float = 1.0,
        probe_budget: float = 0.5,
    ) -> None:
        self._check = check
        self._probe_every = probe_every
        self._probe_budget = probe_budget
        self._outage: str | None = None
        self._next_probe = 0.0
        self._probed: anyio.Event | None = None  # set once the probe in flight is done

    @property
    def retry_after(self) -> int:
        """Whole seconds until the gate may open again (at least 1)."""
        return max(1, math.ceil(self._next_probe - anyio.current_time()))

    def trip(self, error: BaseException) -> None:
        """``error`` says the dependency is out of reach: close the gate until a probe
        finds it back."""
        if self._outage is None:
            self._next_probe = anyio.current_time() + self._probe_every
        self._outage = describe(error)

    async def check_now(self) -> None:
        """Run the check now, raising what it raises; the gate follows its verdict."""
        try:
            await self._check()
        except Exception as exc:
            self.trip(exc)
            raise
        self._outage = None

    async def admit(self) -> None:
        """Return unless the dependency is known to be down and the probe, if one is due
        or in flight, does not find it back."""
        if self._outage is None:
            return
        if self._probed is not None:
            await self._probed.wait()
        elif anyio.current_time() >= self._next_probe:
            await self._probe()
        self._refuse_while_down()

    def _refuse_while_down(self) -> None:
        if self._outage is not None:
            raise DependencyDown(self._outage, retry_after=self.retry_after)

    async def _probe(self) -> None:
        probed = self._probed = anyio.Event()
        try:
            outage = await probe(self._check, within=self._probe_budget)
        finally:
            self._probed = None
            probed.set()
        self._outage = outage
        if outage is not None:
            self._next_probe = anyio.current_time() + self._probe_every

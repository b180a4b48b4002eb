"""Concurrent callers' requests sent to the store together, one round trip per batch.

A consumer running many short commands spends more CPU on the store client's per-call
machinery than on the data each call carries, and its runs ask the store for the same
kinds of things at nearly the same time (read the dispatched run, record its start,
record its result). Sending those together costs one round trip instead of one each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar, cast

import anyio
from anyio.abc import TaskStatus as StartedStatus

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")

MOST_PER_BATCH = 64
"""Requests one round trip carries at most."""


class Pending(Generic[RequestT, ResultT]):
    """One caller's request, and its answer once the batch it went with is back."""

    __slots__ = ("answered", "error", "request", "result")

    def __init__(self, request: RequestT) -> None:
        self.request = request
        self.answered = anyio.Event()
        self.result: ResultT | None = None
        self.error: Exception | None = None


class Coalescer(Generic[RequestT, ResultT]):
    """Sends the requests of concurrent callers through one batched store call.

    Batching is natural, never timed: an idle coalescer sends a request at once (a batch
    of one); while that round trip is in flight, requests queue, and the next round trip
    takes all of them (at most ``most``). A batch that fails (``StoreUnavailable``, say)
    fails every request in it alike; each caller decides what to do again, as it would
    have for a call of its own. Requests given up (the caller was cancelled) before
    their batch went out are not sent.

    ``serve`` must run, in a task group that outlives every caller of ``submit``.
    """

    def __init__(
        self,
        round_trip: Callable[[Sequence[RequestT]], Awaitable[Sequence[ResultT]]],
        *,
        most: int = MOST_PER_BATCH,
    ) -> None:
        self._round_trip = round_trip
        self._most = most
        self._queued: list[Pending[RequestT, ResultT]] = []
        self._arrived = anyio.Event()

    async def submit(self, request: RequestT) -> ResultT:
        """Send ``request`` with the others waiting now; its answer, or what the batch raised."""
        return await self.answer(self.request(request))

    def request(self, request: RequestT) -> Pending[RequestT, ResultT]:
        """Queue ``request`` without waiting for it: ``answer`` gives its answer later."""
        pending = Pending[RequestT, ResultT](request)
        self._queued.append(pending)
        self._arrived.set()
        return pending

    async def answer(self, pending: Pending[RequestT, ResultT]) -> ResultT:
        """The answer to a ``request``, or what its batch raised; given up before its
        batch went out (the caller was cancelled), it is not sent."""
        try:
            await pending.answered.wait()
        finally:
            if not pending.answered.is_set() and pending in self._queued:
                self._queued.remove(pending)
        if pending.error is not None:
            raise pending.error
        return cast(ResultT, pending.result)

    async def serve(self, *, task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send what is queued, batch after batch, until cancelled."""
        task_status.started()
        while True:
            if not self._queued:
                self._arrived = anyio.Event()
                await self._arrived.wait()
            batch, self._queued = self._queued[: self._most], self._queued[self._most :]
            await self._send(batch)

    async def _send(self, batch: list[Pending[RequestT, ResultT]]) -> None:
        try:
            results = await self._round_trip([pending.request for pending in batch])
        except Exception as exc:
            for pending in batch:
                pending.error = exc
                pending.answered.set()
            return
        for pending, result in zip(batch, results, strict=True):
            pending.result = result
            pending.answered.set()

"""``EventLog.follow_events`` for both store adapters, over their own reads of the log: one
shared read of the log's tail at a time in this process, whatever the number of
followers, and at most ``limit`` followers in all.

An adapter supplies ``read`` (its ``read_events``: events after an id, at once),
``newest`` (the id of the newest event, ``"0-0"`` when there is none) and ``wait_after``
(events after an id, waiting up to ``wait`` seconds for some). A follower first catches
up on its own with ``read`` until it reaches the end of the log; from then on it takes
the pages of the shared reads of the tail, which whichever follower needs a page while
no read is in flight does for all. A follower that falls more than ``BACKLOG_PAGES``
pages behind the shared reads catches up on its own again, so it never skips an event
the log still has (and learns of the ones it no longer has: ``missed``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from app.adapters.output_followers import BACKLOG_PAGES
from app.events import Event, event_key
from app.ports import EventBatch, TooManyFollowers

PAGE_SIZE = 100
"""Events one read returns at most."""


@dataclass(eq=False, slots=True)
class _Follower:
    position: str  # the id of the last event handed out (or the point followed from)
    next_page: int = -1  # index, in the shared page log, of the next page to take
    catching_up: bool = False  # reading on its own, not yet from the shared pages


@dataclass(eq=False, slots=True)
class _Tail:
    """The shared reads of the log's tail: pages read that some follower still needs."""

    cursor: str | None = None  # the id the next shared read starts after
    pages: list[EventBatch] = field(default_factory=list[EventBatch])
    first_page: int = 0  # index of ``pages[0]`` in the page log
    reading: anyio.Event | None = None  # set when the read in flight is over
    followers: list[_Follower] = field(default_factory=list[_Follower])

    @property
    def end(self) -> int:
        return self.first_page + len(self.pages)

    def forget_pages_everyone_has(self) -> None:
        """Drop pages every follower took, and beyond ``BACKLOG_PAGES`` the oldest (a
        follower that needs one then catches up on its own)."""
        needed = min((f.next_page for f in self.followers if f.next_page >= 0), default=self.end)
        oldest = max(needed, self.first_page, self.end - BACKLOG_PAGES)
        del self.pages[: oldest - self.first_page]
        self.first_page = oldest


class EventFollowers:
    """Implements ``EventLog.follow_events`` over an adapter's reads."""

    def __init__(
        self,
        *,
        read: Callable[[str, int], Awaitable[EventBatch]],
        newest: Callable[[], Awaitable[str]],
        wait_after: Callable[[str, float], Awaitable[list[Event]]],
        quiet: float,
        limit: int,
    ) -> None:
        self._read = read
        self._newest = newest
        self._wait_after = wait_after
        self._quiet = quiet
        self._limit = limit
        self._tail = _Tail()
        self._count = 0

    @asynccontextmanager
    async def follow(self, after: str | None) -> AsyncGenerator[AsyncIterator[EventBatch]]:
        if self._count >= self._limit:
            raise TooManyFollowers(self._limit, "event streams")
        self._count += 1
        try:
            newest = await self._newest()  # (also: the store answers, or this raises)
            follower = _Follower(position=after if after is not None else newest)
            self._tail.followers.append(follower)
            try:
                batches = self._batches(follower)
                try:
                    yield batches
                finally:
                    await batches.aclose()
            finally:
                self._leave(follower)
        finally:
            self._count -= 1

    def _leave(self, follower: _Follower) -> None:
        self._tail.followers.remove(follower)
        if not self._tail.followers:
            # Whoever comes next starts the shared reads at the end of the log again,
            # not where they stopped.
            self._tail = _Tail()
        else:
            self._tail.forget_pages_everyone_has()

    async def _batches(self, follower: _Follower) -> AsyncGenerator[EventBatch]:
        while True:
            if follower.catching_up or follower.next_page < self._tail.first_page:
                batch = await self._catch_up(follower)
                if batch.events or batch.missed is not None:
                    yield batch
                continue
            page = await self._next_page(follower)
            fresh = [e for e in page.events if event_key(e.id) > event_key(follower.position)]
            if page.missed is not None:
                follower.next_page = -1  # the shared read found a gap: see for itself
            elif fresh or not page.events:
                if fresh:
                    follower.position = fresh[-1].id
                yield EventBatch(fresh)  # (an empty one: nothing for a while)

    async def _catch_up(self, follower: _Follower) -> EventBatch:
        """One read of the follower's own towards the end of the log. It takes the
        shared reads' pages from when it began (its own reads cover everything before),
        and once at the end of the log, it goes on with them."""
        tail = self._tail
        if not follower.catching_up:
            follower.catching_up = True
            follower.next_page = tail.end
        batch = await self._read(follower.position, PAGE_SIZE)
        if batch.events:
            follower.position = batch.events[-1].id
        if len(batch.events) < PAGE_SIZE:
            if tail.cursor is None:
                # The first follower to get here starts the shared reads at the end of
                # the log (not at its own position, which a client may have set ahead).
                newest = await self._newest()
                if tail.cursor is None:
                    tail.cursor = newest
            if event_key(tail.cursor) <= event_key(follower.position):
                follower.catching_up = False
            else:
                # The shared reads start after events this follower has not read (they
                # were written while it read): read on until there.
                follower.next_page = tail.end
        return batch

    async def _next_page(self, follower: _Follower) -> EventBatch:
        tail = self._tail
        while follower.next_page == tail.end:
            if tail.reading is not None:
                await tail.reading.wait()  # a read for everyone is in flight
                continue
            tail.reading = done = anyio.Event()
            try:
                assert tail.cursor is not None
                page = await self._read_tail(tail.cursor)
                if page.events:
                    tail.cursor = page.events[-1].id
                tail.pages.append(page)
                tail.forget_pages_everyone_has()
            finally:
                # Also when this follower left mid-read: another one reads next.
                tail.reading = None
                done.set()
        if follower.next_page < tail.first_page:
            return EventBatch((), missed="")  # fell behind the backlog: catch up
        page = tail.pages[follower.next_page - tail.first_page]
        follower.next_page += 1
        tail.forget_pages_everyone_has()
        return page

    async def _read_tail(self, cursor: str) -> EventBatch:
        """Events after ``cursor``: at once when there are some (or when the log dropped
        some before they were read: ``missed``), else waiting up to the quiet interval."""
        batch = await self._read(cursor, PAGE_SIZE)
        if batch.events or batch.missed is not None:
            return batch
        return EventBatch(await self._wait_after(cursor, self._quiet))

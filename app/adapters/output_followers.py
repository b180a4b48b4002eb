"""``LiveOutput.follow`` for both store adapters, over their own way of reading a run's
live output: one read of the store at a time per run, shared by every follower of that
run in this process, and at most ``limit`` followers in all.

An adapter supplies two reads of a run's live output, each returning the entries found
(``OutputEntry``: a chunk, an end mark, or something else to skip) and a cursor to read on
from: ``start`` (everything kept, and mark the output as followed so that the commit
ending the run ends it too) and ``read_after`` (entries after a cursor, waiting up to
``wait`` seconds for some). Whichever follower needs a page while no read is in flight
does the read for all; the others wait for it. So 40 followers of one run cost one
blocked connection, not 40, and no task of their own.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio

from app.ports import OutputChunk, OutputPage, TooManyFollowers

OutputEntry = tuple[str, OutputChunk | Literal["end"] | None]
"""A live output entry as an adapter read it: its id, and a chunk, the end mark, or
``None`` for an entry followers skip (a follow mark)."""

BACKLOG_PAGES = 32
"""Pages kept for the slowest follower of a run: one further behind skips the oldest (it
shows as a gap, as output trimmed from the live output does) rather than holding them."""

Read = tuple[list[OutputEntry], str]
"""Entries read, and the cursor after them."""


def read_result(entries: Iterable[OutputEntry], *, cursor: str) -> Read:
    """The entries up to and including an end mark, and the id of the last one (or
    ``cursor`` when there is none)."""
    kept: list[OutputEntry] = []
    for entry in entries:
        kept.append(entry)
        cursor = entry[0]
        if entry[1] == "end":
            break
    return kept, cursor


@dataclass(eq=False, slots=True)
class _Follower:
    next_page: int  # index, in the run's page log, of the next page to hand out
    seen_until: int = 0  # output offset up to which chunks were handed out


@dataclass(eq=False, slots=True)
class _RunReader:
    """The shared reads of one run: pages read so far that some follower still needs."""

    cursor: str | None = None
    pages: list[list[OutputEntry]] = field(default_factory=list[list[OutputEntry]])
    first_page: int = 0  # index of ``pages[0]`` in the run's page log
    reading: anyio.Event | None = None  # set when the read in flight is over
    ended: bool = False
    followers: list[_Follower] = field(default_factory=list[_Follower])

    @property
    def end(self) -> int:
        return self.first_page + len(self.pages)

    def forget_pages_everyone_has(self) -> None:
        oldest = min((f.next_page for f in self.followers), default=self.end)
        oldest = max(oldest, self.end - BACKLOG_PAGES)
        del self.pages[: oldest - self.first_page]
        self.first_page = oldest
        for follower in self.followers:
            follower.next_page = max(follower.next_page, oldest)


class OutputFollowers:
    """Implements ``LiveOutput.follow`` over an adapter's ``start`` and ``read_after``."""

    def __init__(
        self,
        *,
        start: Callable[[str], Awaitable[Read]],
        read_after: Callable[[str, str, float], Awaitable[Read]],
        quiet: float,
        limit: int,
    ) -> None:
        self._start = start
        self._read_after = read_after
        self._quiet = quiet
        self._limit = limit
        self._readers: dict[str, _RunReader] = {}
        self._count = 0

    @asynccontextmanager
    async def follow(self, run_id: str) -> AsyncGenerator[AsyncIterator[OutputPage]]:
        if self._count >= self._limit:
            raise TooManyFollowers(self._limit)
        reader = self._readers.setdefault(run_id, _RunReader())
        # Joined before the first read: whatever the shared reads find from now on
        # reaches this follower, and the first read covers everything before.
        follower = _Follower(next_page=reader.end)
        reader.followers.append(follower)
        self._count += 1
        try:
            entries, cursor = await self._start(run_id)
            if reader.cursor is None:
                # The shared reads go on from here: followers that joined before this
                # read but started theirs earlier get what it found from the log.
                reader.cursor = cursor
                reader.pages.append(entries)
                reader.ended = any(entry == "end" for _, entry in entries)
                follower.next_page = reader.end  # this follower has it as its first page
            pages = self._pages(run_id, reader, follower, entries)
            try:
                yield pages
            finally:
                await pages.aclose()
        finally:
            self._count -= 1
            reader.followers.remove(follower)
            if not reader.followers:
                del self._readers[run_id]
            else:
                reader.forget_pages_everyone_has()

    async def _pages(
        self, run_id: str, reader: _RunReader, follower: _Follower, first: list[OutputEntry]
    ) -> AsyncGenerator[OutputPage]:
        page = _unseen(follower, first)
        yield page
        while not page.ended:
            page = _unseen(follower, await self._next_entries(run_id, reader, follower))
            yield page

    async def _next_entries(
        self, run_id: str, reader: _RunReader, follower: _Follower
    ) -> list[OutputEntry]:
        while follower.next_page == reader.end:
            if reader.ended:
                return [("", "end")]
            if reader.reading is not None:
                await reader.reading.wait()  # a read for everyone is in flight
                continue
            reader.reading = done = anyio.Event()
            try:
                assert reader.cursor is not None
                entries, reader.cursor = await self._read_after(run_id, reader.cursor, self._quiet)
                reader.pages.append(entries)
                reader.ended = any(entry == "end" for _, entry in entries)
                reader.forget_pages_everyone_has()
            finally:
                # Also when this follower left mid-read: another one reads next.
                reader.reading = None
                done.set()
        entries = reader.pages[follower.next_page - reader.first_page]
        follower.next_page += 1
        reader.forget_pages_everyone_has()
        return entries


def _unseen(follower: _Follower, entries: Iterable[OutputEntry]) -> OutputPage:
    """The page of ``entries`` this follower has not seen: a follower's first read and
    the shared reads overlap, and nothing is handed out twice."""
    chunks: list[OutputChunk] = []
    for _, entry in entries:
        if entry == "end":
            return OutputPage(chunks, ended=True)
        if entry is not None and entry.offset + len(entry.data) > follower.seen_until:
            chunks.append(entry)
            follower.seen_until = entry.offset + len(entry.data)
    return OutputPage(chunks, ended=False)

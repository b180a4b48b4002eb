"""Live output: a running command's output, forwarded while it runs and followed by readers.

The consumer side (``OutputRelay``) batches what its commands print and appends it to
each run's live output in the store, at most every ``FLUSH_SECONDS``; a command that
ends within its first interval never touches the store, so short runs cost nothing
extra (not even a task of their own).
The reader side (``follow_output``) follows the live output (``LiveOutput.follow``)
until the commit that ends the run ends it, then finishes with the run as recorded.

The live output keeps the newest ``TASKQ_OUTPUT_LIMIT`` bytes; the run record keeps the
head and the tail. Live output is a view, never the record: losing part of it (a store
outage, a reader that fell behind the trimming) shows as a gap notice, not as wrong data.
"""

from __future__ import annotations

import codecs
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio

from app.domain import FINISHED_RUN_STATUSES, Run, RunNotFound, UnreadableRun
from app.logs import about
from app.ports import (
    FOLLOW_KEEPALIVE,
    LiveOutput,
    OutputChunk,
    OutputPage,
    Store,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
FLUSH_BYTES = 64 * 1024
KEEPALIVE_SECONDS = FOLLOW_KEEPALIVE
"""Default seconds between keep-alives of a quiet run (``TASKQ_KEEPALIVE_SECONDS``)."""


class OutputRelay:
    """Forwards the output of a consumer's running commands to their live output in the
    store: one task for all of them, flushing each run's batch every ``FLUSH_SECONDS``
    (sooner at ``FLUSH_BYTES``) once the run has been going for that long."""

    def __init__(self, store: LiveOutput, *, keep: int) -> None:
        self._store = store
        self._keep = keep
        self._outputs: dict[str, RunOutput] = {}
        self._full = anyio.Event()

    def open(self, run_id: str) -> RunOutput:
        """Start forwarding the output of a run that starts now."""
        output = RunOutput(self._store, run_id, keep=self._keep, on_full=self._wake)
        self._outputs[run_id] = output
        return output

    def close(self, output: RunOutput) -> None:
        """Stop forwarding on the relay's schedule (the command ended)."""
        self._outputs.pop(output.run_id, None)

    async def forward(self) -> None:
        """Flush what is due, until cancelled."""
        while True:
            with anyio.move_on_after(FLUSH_SECONDS):
                await self._full.wait()
            self._full = anyio.Event()
            now = time.monotonic()
            for output in list(self._outputs.values()):
                if output.due(now):
                    await output.flush()

    def _wake(self) -> None:
        self._full.set()


class RunOutput:
    """The output of one running command, on its way to the run's live output."""

    def __init__(
        self, store: LiveOutput, run_id: str, *, keep: int, on_full: Callable[[], None]
    ) -> None:
        self.run_id = run_id
        self._store = store
        self._keep = keep
        self._on_full = on_full
        self._opened = time.monotonic()
        self._pending = bytearray()
        self._offset = 0  # where ``_pending`` starts in the command's whole output
        self._flushing: anyio.Lock | None = None  # made at the first flush: most runs have none
        self._in_use = False

    def append(self, chunk: bytes) -> None:
        """Take a chunk the command printed (the executor's output listener)."""
        self._pending += chunk
        self._trim()
        if len(self._pending) >= FLUSH_BYTES:
            self._on_full()

    def due(self, now: float) -> bool:
        """Whether the pending batch should go now."""
        return bool(self._pending) and (
            now - self._opened >= FLUSH_SECONDS or len(self._pending) >= FLUSH_BYTES
        )

    async def finish(self, *, within: float = math.inf) -> None:
        """Write what is left, if the live output is in use, giving up after ``within``
        seconds: a follower then has all of it before the commit that ends the run marks
        the end. (Most runs have no follower: they pay for no timer here.)"""
        if self._in_use:
            with anyio.move_on_after(within):
                await self.flush()

    async def flush(self) -> None:
        """Write the pending batch (one flush at a time, so chunks reach the store in order)."""
        if self._flushing is None:
            self._flushing = anyio.Lock()
        async with self._flushing:
            if not self._pending:
                return
            self._trim(to=self._keep)
            chunk = OutputChunk(self._offset, bytes(self._pending))
            self._pending.clear()
            self._offset += len(chunk.data)
            try:
                await self._store.append_output(self.run_id, chunk, keep=self._keep)
            except StoreUnavailable as exc:
                # Keep it for the next try; followers see a gap if it has to be trimmed.
                log.debug("live output of %s not written: %s", self.run_id, exc)
                self._pending[:0] = chunk.data
                self._offset = chunk.offset
                self._trim(to=self._keep)
            else:
                self._in_use = True

    def _trim(self, *, to: int | None = None) -> None:
        """Drop the oldest pending bytes beyond ``keep``: lazily while appending (at twice
        ``keep``, so that a fast writer costs amortised O(1) per byte), exactly with ``to``."""
        limit = 2 * self._keep if to is None else to
        if len(self._pending) > limit:
            excess = len(self._pending) - self._keep
            del self._pending[:excess]
            self._offset += excess


@dataclass(frozen=True, slots=True)
class OutputText:
    """Output of the run, decoded as UTF-8 (invalid bytes replaced)."""

    text: str


@dataclass(frozen=True, slots=True)
class OutputEnd:
    """The run ended: as recorded (``None`` if it was deleted meanwhile)."""

    run: Run | None


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Nothing new for a while; the run goes on."""


OutputEvent = OutputText | OutputEnd | KeepAlive


async def follow_output(
    store: Store, task_id: str, run_id: str, *, follow: bool
) -> AsyncGenerator[OutputEvent]:
    """The output of a run: what there is now, and with ``follow`` what comes until the
    run ends. Raises ``RunNotFound`` (before anything is read) when there is no such run,
    and ``TooManyFollowers`` when this process follows as many live outputs as it may.
    """
    run = await store.get_run(task_id, run_id)
    if run is None:
        raise RunNotFound(task_id, run_id)
    if run.status in FINISHED_RUN_STATUSES:
        return _recorded(run)  # nothing to follow: leave nothing behind in the store
    async with AsyncExitStack() as following:
        pages = await following.enter_async_context(store.follow(run_id))
        first = await anext(pages)
        # Read again now that we follow: a run that ends from here on gets an end.
        run = await store.get_run(task_id, run_id)
        if run is None:
            raise RunNotFound(task_id, run_id)
        if run.status in FINISHED_RUN_STATUSES:
            events = _recorded(run)
        elif not follow:
            events = _events(store, run, first, None)
        else:
            # The events own the following from here on, and end it when they end.
            events = _events(store, run, first, pages, following.pop_all())
    return events


async def _run_as_now(store: Store, run: Run) -> Run | None:
    """``run`` read again; ``None`` when it is gone, or when its document became
    unreadable meanwhile (logged: the stream then ends as for a deleted run)."""
    try:
        return await store.get_run(run.task_id, run.run_id)
    except UnreadableRun as unreadable:
        log.warning(
            "%s: %s; its output stream ends",
            unreadable,
            unreadable.reason,
            extra=about(run.task_id, run.run_id),
        )
        return None


async def _recorded(run: Run) -> AsyncGenerator[OutputEvent]:
    """A run that ended: its record has everything there is."""
    if run.output:
        yield OutputText(run.output)
    yield OutputEnd(run)


async def _events(
    store: Store,
    run: Run,
    page: OutputPage,
    pages: AsyncIterator[OutputPage] | None,
    following: AsyncExitStack | None = None,
) -> AsyncGenerator[OutputEvent]:
    """The events of ``page``, then (with ``pages``) of each page that follows."""
    async with following or AsyncExitStack():
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        expected = 0
        received = False
        while True:
            for chunk in page.chunks:
                if chunk.offset > expected:
                    yield OutputText(
                        decoder.decode(b"", final=True)
                        + f"\n[... {chunk.offset - expected} bytes of output not kept ...]\n"
                    )
                    decoder.reset()
                skip = max(0, expected - chunk.offset)  # overlap with what was already shown
                text = decoder.decode(chunk.data[skip:])
                expected = max(expected, chunk.offset + len(chunk.data))
                received = True
                if text:
                    yield OutputText(text)
            if not page.ended:
                if pages is None:
                    return
                page = await anext(pages)
                if page.chunks or page.ended:
                    continue
                # Quiet for a while: make sure the run still goes on (its live output may
                # have expired, or the run may have been deleted).
                current = await _run_as_now(store, run)
                if current is not None and current.status not in FINISHED_RUN_STATUSES:
                    yield KeepAlive()
                    continue
            final = await _run_as_now(store, run)
            rest = decoder.decode(b"", final=True)
            if not received and final is not None:
                # The command ended before its first batch was forwarded.
                rest += final.output
            if rest:
                yield OutputText(rest)
            yield OutputEnd(final)
            return

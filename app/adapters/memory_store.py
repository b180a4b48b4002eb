"""The in-memory store: the reference behaviour of ``Store``, and dev mode's store.

Documents are kept encoded, as Redis keeps them, so callers never share mutable state
with the store. Every method runs without awaiting in between, which makes each one
atomic on a single event loop.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.lowlevel
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from app.adapters.event_followers import EventFollowers
from app.adapters.output_followers import OutputEntry, OutputFollowers, Read, read_result
from app.adapters.task_documents import (
    decode_run,
    decode_task,
    readable_run,
    readable_task,
    run_history,
)
from app.domain import (
    FINISHED_RUN_STATUSES,
    RevisionConflict,
    Run,
    Task,
    TaskAlreadyExists,
    TaskStatus,
)
from app.events import Event, event_key
from app.notifications import (
    Notification,
    NotificationRecord,
    NotifyEvent,
    OutboxEntry,
    new_entry,
)
from app.ports import (
    ENDED_OUTPUT_TTL,
    EVENT_HISTORY,
    FOLLOW_KEEPALIVE,
    LIVE_OUTPUT_TTL,
    MAX_FOLLOWERS,
    Claim,
    DueAt,
    EventBatch,
    Keep,
    OutputChunk,
    OutputPage,
    RunHistory,
    ScheduledEntry,
    TaskChange,
    TaskPage,
    Unschedule,
)

_entry_decoder = msgspec.json.Decoder(OutboxEntry)
_record_decoder = msgspec.json.Decoder(NotificationRecord)

_READ_PAGE_SIZE = 100
"""Entries one read after a cursor returns at most (as Redis does)."""

_Mark = Literal["follow", "end"]
_OutputEntry = tuple[int, OutputChunk | _Mark]


@dataclass(slots=True)
class _LiveOutput:
    """A run's live output, shaped like its Redis stream: entries with increasing ids,
    each a chunk or a mark. A follow mark stands in for output when a follower starts
    before there is any; the end mark, once recorded, is the newest entry for good."""

    entries: list[_OutputEntry] = field(default_factory=list[_OutputEntry])
    expires_at: float = math.inf

    @property
    def ended(self) -> bool:
        return bool(self.entries) and self.entries[-1][1] == "end"


class MemoryStore:
    """Implements ``TaskStore``, ``CancelNotices``, ``LiveOutput``, ``NotificationOutbox``
    and ``EventLog`` in process memory."""

    def __init__(
        self,
        *,
        run_history: int,
        event_history: int = EVENT_HISTORY,
        follow_keepalive: float = FOLLOW_KEEPALIVE,
        max_followers: int = MAX_FOLLOWERS,
    ) -> None:
        self._run_history = run_history
        self._event_log = _EventLog(event_history)
        self._event_followers = EventFollowers(
            read=self._event_log.read,
            newest=self._event_log.newest,
            wait_after=self._event_log.wait_after,
            quiet=follow_keepalive,
            limit=max_followers,
        )
        self._tasks: dict[str, bytes] = {}
        self._queues: set[str] = set()
        self._ids: list[str] = []
        self._ids_by_status: dict[TaskStatus, list[str]] = {s: [] for s in TaskStatus}
        self._runs: dict[str, dict[str, bytes]] = {}
        self._due: dict[str, float] = {}
        self._claims: dict[str, str] = {}
        self._outbox = _Outbox()
        self._wakeup = anyio.Event()
        self._cancel_listeners: list[MemoryObjectSendStream[str]] = []
        self._outputs: dict[str, _LiveOutput] = {}
        self._output_ids = itertools.count(1)
        self._output_added = anyio.Event()
        self._followers = OutputFollowers(
            start=self._start_following,
            read_after=self._read_after,
            quiet=follow_keepalive,
            limit=max_followers,
        )

    async def ping(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def note_queues(self, queues: Sequence[str]) -> None:
        await anyio.lowlevel.checkpoint()
        self._queues.update(queues)

    async def queues_in_use(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return sorted(self._queues)

    async def get_task(self, task_id: str) -> Task | None:
        await anyio.lowlevel.checkpoint()
        return self._task(task_id)

    async def get_tasks(self, task_ids: Sequence[str]) -> list[Task | None]:
        await anyio.lowlevel.checkpoint()
        return [self._readable(task_id) for task_id in task_ids]

    async def list_tasks(
        self, *, status: TaskStatus | None, limit: int, after: str | None
    ) -> TaskPage:
        await anyio.lowlevel.checkpoint()
        ids = self._ids if status is None else self._ids_by_status[status]
        start = 0 if after is None else bisect.bisect_right(ids, after)
        read = ids[start : start + limit]
        tasks: list[Task] = []
        unreadable: list[str] = []
        for task_id in read:
            task = self._readable(task_id)
            if task is None:
                unreadable.append(task_id)
            else:
                tasks.append(task)
        more = start + limit < len(ids)
        return TaskPage(tasks, unreadable, after=read[-1] if more else None)

    async def scheduled_entries(
        self, *, until: float, offset: int, limit: int
    ) -> list[ScheduledEntry]:
        await anyio.lowlevel.checkpoint()
        entries = sorted((when, task_id) for task_id, when in self._due.items() if when <= until)
        return [
            ScheduledEntry(task_id, when, self._readable(task_id))
            for when, task_id in entries[offset : offset + limit]
        ]

    async def busy_tasks(self, *, limit: int) -> list[Task]:
        await anyio.lowlevel.checkpoint()
        running = self._ids_by_status[TaskStatus.RUNNING]
        ids = list(dict.fromkeys([*running, *self._claims]))[:limit]
        return [task for task in map(self._readable, ids) if task is not None]

    def _task(self, task_id: str) -> Task | None:
        """The task, or ``None``; ``UnreadableTask`` when its document cannot be read
        (only a test can store one here)."""
        doc = self._tasks.get(task_id)
        return None if doc is None else decode_task(task_id, doc)

    def _readable(self, task_id: str) -> Task | None:
        """The task, or ``None`` when it is gone or its document cannot be read (logged)."""
        return readable_task(task_id, self._tasks.get(task_id))

    async def commit(self, change: TaskChange) -> None:
        await anyio.lowlevel.checkpoint()
        self._commit_now(change)

    async def create_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        await anyio.lowlevel.checkpoint()
        for change in changes:
            if change.expected_revision is not None or change.task is None or change.runs:
                raise ValueError(f"not the creation of a task: {change!r}")
        created: list[bool] = []
        for change in changes:  # no await between them: waiters wake once, after all
            try:
                self._commit_now(change)
            except TaskAlreadyExists:
                created.append(False)
            else:
                created.append(True)
        return created

    def _commit_now(self, change: TaskChange) -> None:
        if self._applied_already(change):
            return  # sent again after its answer was lost (as Redis's commit script)
        for chained in change.chained:  # all or none: check every one first
            if not self._applied_already(chained):
                continue
            raise RevisionConflict(chained.task_id)
        for each in (change, *change.chained):
            self._apply(each, self._task(each.task_id))  # readable: checked above

    def _applied_already(self, change: TaskChange) -> bool:
        """Whether ``change`` is stored already; raise if it cannot apply."""
        task_id = change.task_id
        current_doc = self._tasks.get(task_id)
        if change.task is not None and current_doc == msgspec.json.encode(change.task):
            return True
        if change.expected_revision is None:
            if current_doc is not None:
                raise TaskAlreadyExists(task_id)
            return False
        # A document that cannot be read has no revision to match (as in Redis).
        current = readable_task(task_id, current_doc)
        if current is None or current.revision != change.expected_revision:
            raise RevisionConflict(task_id)
        return False

    def _apply(self, change: TaskChange, current: Task | None) -> None:
        task_id = change.task_id
        self._event_log.write(change.events)
        if change.task is None:
            if current is not None:
                self._delete(task_id, [current.status])
            return
        if current is None:
            bisect.insort(self._ids, task_id)
        elif current.status != change.task.status:
            _discard_sorted(self._ids_by_status[current.status], task_id)
        if current is None or current.status != change.task.status:
            bisect.insort(self._ids_by_status[change.task.status], task_id)
        self._tasks[task_id] = msgspec.json.encode(change.task)
        self._outbox.add(change.notifications)
        runs = self._runs.setdefault(task_id, {})
        for run in change.runs:
            runs[run.run_id] = msgspec.json.encode(run)
        for old in sorted(runs)[: max(0, len(runs) - self._run_history)]:
            del runs[old]
            self._outbox.records.pop(old, None)
        self._end_outputs(run.run_id for run in change.runs if run.status in FINISHED_RUN_STATUSES)
        self._apply_schedule(task_id, change.schedule)

    async def commit_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        applied: list[bool] = []
        for change in changes:
            try:
                await self.commit(change)
            except (RevisionConflict, TaskAlreadyExists):
                applied.append(False)
            else:
                applied.append(True)
        return applied

    def _delete(self, task_id: str, statuses: Iterable[TaskStatus]) -> list[str]:
        """Delete the task, its runs (with their notification records) and its entries
        in every index (in those of ``statuses``); the ids of the runs deleted."""
        del self._tasks[task_id]
        _discard_sorted(self._ids, task_id)
        for status in statuses:
            _discard_sorted(self._ids_by_status[status], task_id)
        run_ids = list(self._runs.pop(task_id, {}))
        for run_id in run_ids:
            self._outbox.records.pop(run_id, None)
        self._due.pop(task_id, None)
        self._claims.pop(task_id, None)
        return run_ids

    async def delete_unreadable(
        self, task_id: str, document: bytes, *, events: Sequence[Event]
    ) -> list[str] | None:
        await anyio.lowlevel.checkpoint()
        if self._tasks.get(task_id) != document:
            return None
        self._event_log.write(events)
        return self._delete(task_id, TaskStatus)

    def _apply_schedule(self, task_id: str, schedule: Keep | Unschedule | DueAt) -> None:
        match schedule:
            case Keep():
                return
            case Unschedule():
                self._due.pop(task_id, None)
            case DueAt(when=when):
                earliest = min(self._due.values(), default=math.inf)
                self._due[task_id] = when
                if when < earliest:
                    self._wake()
        self._claims.pop(task_id, None)

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = anyio.Event()

    async def get_run(self, task_id: str, run_id: str) -> Run | None:
        await anyio.lowlevel.checkpoint()
        return self._run(task_id, run_id)

    def _run(self, task_id: str, run_id: str) -> Run | None:
        """The run, or ``None``; ``UnreadableRun`` when its document cannot be read (only
        a test can store one here)."""
        doc = self._run_document(task_id, run_id)
        return None if doc is None else decode_run(task_id, run_id, doc)

    async def get_task_and_run(self, task_id: str, run_id: str) -> tuple[Task | None, Run | None]:
        await anyio.lowlevel.checkpoint()
        return self._task(task_id), self._run(task_id, run_id)

    async def get_tasks_and_runs(
        self, pairs: Sequence[tuple[str, str]]
    ) -> list[tuple[Task | None, Run | None]]:
        await anyio.lowlevel.checkpoint()
        return [
            (
                self._readable(task_id),
                readable_run(task_id, run_id, self._run_document(task_id, run_id)),
            )
            for task_id, run_id in pairs
        ]

    def _run_document(self, task_id: str, run_id: str) -> bytes | None:
        return self._runs.get(task_id, {}).get(run_id)

    async def read_and_commit_each(
        self, pairs: Sequence[tuple[str, str]], changes: Sequence[TaskChange]
    ) -> tuple[list[tuple[Task | None, Run | None]], list[bool]]:
        return await self.get_tasks_and_runs(pairs), await self.commit_each(changes)

    async def list_runs(self, task_id: str, *, limit: int) -> RunHistory:
        await anyio.lowlevel.checkpoint()
        runs = self._runs.get(task_id, {})
        newest = sorted(runs, reverse=True)[:limit]
        return run_history(task_id, ((run_id, runs[run_id]) for run_id in newest))

    async def claim_due(self, *, now: float, limit: int, lease: float, token: str) -> list[Claim]:
        await anyio.lowlevel.checkpoint()
        due = sorted(
            ((when, task_id) for task_id, when in self._due.items() if when <= now),
        )[:limit]
        claims: list[Claim] = []
        for when, task_id in due:
            self._due[task_id] = now + lease
            self._claims[task_id] = token
            claims.append(Claim(task_id, self._readable(task_id), when))
        return claims

    async def release_claims(self, *, token: str, task_ids: Sequence[str]) -> None:
        await anyio.lowlevel.checkpoint()
        for task_id in task_ids:
            if self._claims.get(task_id) == token:
                del self._claims[task_id]
                self._due.pop(task_id, None)

    async def count_due(self, *, now: float) -> int:
        await anyio.lowlevel.checkpoint()
        return sum(1 for when in self._due.values() if when <= now)

    async def extend_leases(self, task_ids: Sequence[str], *, until: float) -> None:
        await anyio.lowlevel.checkpoint()
        for task_id in task_ids:
            if task_id in self._due:
                self._due[task_id] = until

    async def append_output(self, run_id: str, chunk: OutputChunk, *, keep: int) -> None:
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        self._forget_expired_outputs(now)
        output = self._outputs.setdefault(run_id, _LiveOutput())
        newest = output.entries[-1][1] if output.entries else None
        if newest == "end":
            return  # the run ended: its live output is final
        if isinstance(newest, OutputChunk) and chunk.offset < newest.offset + len(newest.data):
            return  # these bytes are kept already: a resent chunk
        self._add_output_entry(output, chunk)
        stop = chunk.offset + len(chunk.data)
        newest_index = len(output.entries) - 1
        first_kept = next(
            index
            for index, (_, entry) in enumerate(output.entries)
            if index == newest_index
            or (isinstance(entry, OutputChunk) and stop - entry.offset <= keep)
        )
        del output.entries[:first_kept]
        output.expires_at = now + LIVE_OUTPUT_TTL

    def follow(self, run_id: str) -> AbstractAsyncContextManager[AsyncIterator[OutputPage]]:
        return self._followers.follow(run_id)

    async def _start_following(self, run_id: str) -> Read:
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        self._forget_expired_outputs(now)
        output = self._outputs.setdefault(run_id, _LiveOutput())
        if not output.ended:
            if not output.entries:
                self._add_output_entry(output, "follow")
            output.expires_at = now + LIVE_OUTPUT_TTL
        return read_result(_as_read(output.entries), cursor="0")

    async def _read_after(self, run_id: str, cursor: str, wait: float) -> Read:
        await anyio.lowlevel.checkpoint()
        self._forget_expired_outputs(time.monotonic())
        newer = self._output_after(run_id, int(cursor))
        with anyio.move_on_after(wait):
            while not newer:
                await self._output_added.wait()
                newer = self._output_after(run_id, int(cursor))
        return read_result(_as_read(newer), cursor=cursor)

    def _output_after(self, run_id: str, after: int) -> list[_OutputEntry]:
        """Up to a page of the run's live output entries after the id ``after``."""
        output = self._outputs.get(run_id)
        if output is None or output.expires_at <= time.monotonic():
            return []
        start = bisect.bisect_right(output.entries, after, key=lambda entry: entry[0])
        return output.entries[start : start + _READ_PAGE_SIZE]

    def _end_outputs(self, run_ids: Iterable[str]) -> None:
        """Record the end of these runs in their live output, where there is one.

        On every commit, so it leaves expired outputs to ``append_output`` and
        following, the only ways one comes to exist."""
        now = time.monotonic()
        for run_id in run_ids:
            output = self._outputs.get(run_id)
            if output is not None and not output.ended:
                self._add_output_entry(output, "end")
                output.expires_at = now + ENDED_OUTPUT_TTL

    def _add_output_entry(self, output: _LiveOutput, entry: OutputChunk | _Mark) -> None:
        output.entries.append((next(self._output_ids), entry))
        self._output_added.set()
        self._output_added = anyio.Event()

    def _forget_expired_outputs(self, now: float) -> None:
        expired = [run_id for run_id, output in self._outputs.items() if output.expires_at <= now]
        for run_id in expired:
            del self._outputs[run_id]

    async def read_events(self, after: str | None, *, limit: int) -> EventBatch:
        return await self._event_log.read(after, limit)

    def follow_events(
        self, after: str | None
    ) -> AbstractAsyncContextManager[AsyncIterator[EventBatch]]:
        return self._event_followers.follow(after)

    async def announce_cancel(self, run_id: str) -> None:
        await anyio.lowlevel.checkpoint()
        for listener in self._cancel_listeners:
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError):
                listener.send_nowait(run_id)

    @asynccontextmanager
    async def cancel_notices(self) -> AsyncGenerator[AsyncIterator[str]]:
        send, receive = anyio.create_memory_object_stream[str](max_buffer_size=1000)
        self._cancel_listeners.append(send)
        try:
            yield receive
        finally:
            self._cancel_listeners.remove(send)
            send.close()
            receive.close()

    async def wait_for_due(self, *, max_wait: float, ahead: float = 0.0) -> None:
        earliest = min(self._due.values(), default=math.inf)
        delay = min(max_wait, earliest - ahead - time.time())
        if delay <= 0:
            await anyio.lowlevel.checkpoint()
            return
        wakeup = self._wakeup
        with anyio.move_on_after(delay):
            await wakeup.wait()

    async def claim_notifications(
        self, *, now: float, limit: int, lease: float, token: str
    ) -> list[OutboxEntry]:
        await anyio.lowlevel.checkpoint()
        return self._outbox.claim(now=now, limit=limit, lease=lease, token=token)

    async def settle_notification(
        self, entry: OutboxEntry, *, token: str, retry_at: float | None
    ) -> None:
        await anyio.lowlevel.checkpoint()
        self._outbox.settle(entry, token=token, retry_at=retry_at, keep_record=True)

    async def drop_notification(self, entry: OutboxEntry, *, token: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._outbox.settle(entry, token=token, retry_at=None, keep_record=False)

    async def next_notification_due(self) -> float | None:
        await anyio.lowlevel.checkpoint()
        return min(self._outbox.due.values(), default=None)

    async def notification_records(
        self, run_ids: Sequence[str]
    ) -> dict[str, list[NotificationRecord]]:
        await anyio.lowlevel.checkpoint()
        found: dict[str, list[NotificationRecord]] = {}
        for run_id in run_ids:
            if records := self._outbox.records.get(run_id):
                found[run_id] = [
                    _record_decoder.decode(records[event])
                    for event in NotifyEvent
                    if event in records
                ]
        return found


@dataclass(slots=True)
class _Outbox:
    """The notification outbox, shaped as in Redis: due times, entries and claims by
    notification id, and the delivery records of each run by event."""

    due: dict[str, float] = field(default_factory=dict[str, float])
    entries: dict[str, bytes] = field(default_factory=dict[str, bytes])
    claims: dict[str, str] = field(default_factory=dict[str, str])
    records: dict[str, dict[str, bytes]] = field(default_factory=dict[str, dict[str, bytes]])

    def add(self, notifications: Iterable[Notification]) -> None:
        for notification in notifications:
            entry = new_entry(notification)
            self.due[notification.id] = notification.due
            self.entries[notification.id] = msgspec.json.encode(entry)
            records = self.records.setdefault(notification.run_id, {})
            records[notification.event] = msgspec.json.encode(entry.record)

    def claim(self, *, now: float, limit: int, lease: float, token: str) -> list[OutboxEntry]:
        due = sorted((when, note_id) for note_id, when in self.due.items() if when <= now)
        claimed: list[OutboxEntry] = []
        for _, note_id in due[:limit]:
            self.due[note_id] = now + lease
            self.claims[note_id] = token
            claimed.append(_entry_decoder.decode(self.entries[note_id]))
        return claimed

    def settle(
        self, entry: OutboxEntry, *, token: str, retry_at: float | None, keep_record: bool
    ) -> None:
        note_id = entry.notification.id
        if self.claims.get(note_id) != token:
            return
        del self.claims[note_id]
        if retry_at is None:
            del self.due[note_id], self.entries[note_id]
        else:
            self.due[note_id] = retry_at
            self.entries[note_id] = msgspec.json.encode(entry)
        records = self.records.get(entry.notification.run_id, {})
        event = entry.notification.event
        if not keep_record:
            records.pop(event, None)
        elif event in records:
            records[event] = msgspec.json.encode(entry.record)


class _EventLog:
    """The event log, shaped like its Redis stream: ids from the wall clock's
    milliseconds and a sequence number, increasing; the newest ``history`` kept."""

    def __init__(self, history: int) -> None:
        self._history = history
        self._events: list[Event] = []
        self._keys: list[tuple[int, int]] = []
        self._last = (0, 0)
        self._trimmed = False
        self._added = anyio.Event()

    def write(self, events: Sequence[Event]) -> None:
        for event in events:
            millis, sequence = time.time_ns() // 1_000_000, 0
            if millis <= self._last[0]:  # the same millisecond, or the clock went back
                millis, sequence = self._last[0], self._last[1] + 1
            self._last = (millis, sequence)
            self._keys.append(self._last)
            self._events.append(event.logged_as(f"{self._last[0]}-{self._last[1]}"))
        if len(self._events) > self._history:
            del self._events[: -self._history], self._keys[: -self._history]
            self._trimmed = True
        if events:
            self._added.set()
            self._added = anyio.Event()

    async def read(self, after: str | None, limit: int) -> EventBatch:
        await anyio.lowlevel.checkpoint()
        start = 0 if after is None else bisect.bisect_right(self._keys, event_key(after))
        missed = None
        if after is not None and self._trimmed and start == 0 and self._events:
            missed = self._events[0].id
        return EventBatch(self._events[start : start + limit], missed)

    async def newest(self) -> str:
        await anyio.lowlevel.checkpoint()
        return "0-0" if not self._events else self._events[-1].id

    async def wait_after(self, after: str, wait: float) -> list[Event]:
        with anyio.move_on_after(wait):
            while not (self._keys and self._keys[-1] > event_key(after)):
                await self._added.wait()
        return list((await self.read(after, _READ_PAGE_SIZE)).events)


def _as_read(entries: Iterable[_OutputEntry]) -> Iterable[OutputEntry]:
    for entry_id, entry in entries:
        yield str(entry_id), None if entry == "follow" else entry


def _discard_sorted(ids: list[str], task_id: str) -> None:
    index = bisect.bisect_left(ids, task_id)
    if index < len(ids) and ids[index] == task_id:
        del ids[index]

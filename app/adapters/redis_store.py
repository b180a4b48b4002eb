"""The Redis store: the store ports on ``redis.asyncio``, one Lua script per atomic change
(``lua/``, argument layouts in ``redis_scripts``).

Keys, all under the configured prefix (a ``{hash-tag}`` prefix keeps them in one
Redis Cluster slot, which the scripts need because they derive some key names):

- ``task:{id}``         string, the task document (msgspec JSON)
- ``tasks``             sorted set of every task id, all scores 0 (lexicographic paging)
- ``status:{status}``   sorted set of the ids in that status, scores 0
- ``scheduled_tasks``   sorted set, id -> due time (unix seconds); a claimed entry's
                        score is its lease expiry (``scheduled_entries`` reads it in
                        score order with the documents, for the upcoming fires)
- ``claims``            hash, id -> token of the scheduler holding the entry
- ``runs:{id}``         hash, run id -> run document (run ids sort by creation time)
- ``notify_due``        sorted set, notification id -> when it is due (unix seconds); a
                        claimed entry's score is its lease expiry (the notification outbox)
- ``notify_entries``    hash, notification id -> outbox entry (the notification and its
                        delivery so far, JSON)
- ``notify_claims``     hash, notification id -> token of the notifier delivering it
- ``notifications:{run id}``  hash, event -> delivery record shown on the run; deleted
                        with the run (task deleted, or dropped from the run history)
- ``queues``            set of the taskq queues in use (``QueueDirectory``): added to
                        when a task names one or a consumer serves one, never removed
- ``wake``              pub/sub channel: an entry earlier than every other was added
                        (once per commit, or per batch of new tasks)
- ``events``            stream, the event log (``EventLog``): one entry per lifecycle
                        event, field ``e`` = the event's JSON (without its id, which is
                        the entry's id); trimmed to about ``TASKQ_EVENT_HISTORY`` entries
- ``output:{run id}``   stream, a run's live output: data entries ``o`` (byte offset in
                        the whole output, decimal) and ``d`` (the bytes), oldest dropped
                        beyond the bytes to keep; a follow mark ``f`` standing in for
                        output when a follower starts before there is any; once the run
                        ends, an end mark ``e``, always the newest entry: nothing is
                        added after it. Expires ``LIVE_OUTPUT_TTL`` after the last write,
                        ``ENDED_OUTPUT_TTL`` after the end mark.

Every script is idempotent so that redis-py's retry can resend it safely: a commit
whose stored document already equals the new one reports success.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import CoroutineType
from typing import Any, ParamSpec, TypeVar, cast

import anyio
import msgspec
import redis.asyncio as redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    NoScriptError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.adapters.event_followers import PAGE_SIZE, EventFollowers
from app.adapters.output_followers import OutputEntry, OutputFollowers, Read, read_result
from app.adapters.redis_scripts import (
    AppendArgs,
    BusyArgs,
    BusyKeys,
    ChainedArgs,
    ClaimArgs,
    ClaimKeys,
    ClaimNotificationsArgs,
    CommitArgs,
    CommitKeys,
    CreateArgs,
    CreateKeys,
    DeleteUnreadableArgs,
    DeleteUnreadableKeys,
    FollowArgs,
    ListRunsArgs,
    ListRunsKeys,
    ListTasksArgs,
    ListTasksKeys,
    NotificationWrite,
    OutboxKeys,
    OutputKeys,
    ReadEventsArgs,
    ReadEventsKeys,
    ReleaseArgs,
    RunWrite,
    ScheduledArgs,
    ScheduledKeys,
    Script,
    SettleArgs,
    SettleKeys,
    TaskWrite,
    encode_list,
)
from app.adapters.redis_sentinel import SCHEME as SENTINEL_SCHEME
from app.adapters.redis_sentinel import ReplicaAcks, SentinelService, sentinel_clients
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
    UnreadableTask,
)
from app.events import Event, event_key
from app.logs import about
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
    StoreUnavailable,
    TaskChange,
    TaskPage,
    Unschedule,
)

_READ_PAGE_SIZE = 100
"""Entries one read after a cursor returns at most."""

log = logging.getLogger(__name__)

_entry_decoder = msgspec.json.Decoder(OutboxEntry)
_record_decoder = msgspec.json.Decoder(NotificationRecord)
_event_decoder = msgspec.json.Decoder(Event)


def _claimed_task(task_id: str, doc: bytes) -> Task | None:
    """The claimed task, or ``None`` (as if it were gone, so that its entry is dropped)
    when its document cannot be read: one unreadable document (a hand edit, another
    version's) must not stop every scheduler. The document itself is left as it is."""
    try:
        return decode_task(task_id, doc)
    except UnreadableTask as unreadable:
        log.error(
            "%s: %s; its schedule entry is dropped and the document left as it is",
            unreadable,
            unreadable.reason,
            exc_info=True,
            extra=about(task_id),
        )
        return None


_encoder = msgspec.json.Encoder()


_P = ParamSpec("_P")
_T = TypeVar("_T")
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    # A Redis Cluster failing over (its client's retries exhausted):
    ClusterDownError,
    ClusterError,
    TryAgainError,
    SlotNotCoveredError,
    RedisClusterUnreachableError,
)


def _translate_errors(
    method: Callable[_P, CoroutineType[Any, Any, _T]],
) -> Callable[_P, CoroutineType[Any, Any, _T]]:
    """Report Redis being out of reach (after the client's own retries) as the port's
    ``StoreUnavailable``, which callers know to wait out."""

    @functools.wraps(method)
    async def translated(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc

    return translated


class RedisStore:
    """Implements ``TaskStore``, ``CancelNotices``, ``LiveOutput``, ``NotificationOutbox``
    and ``EventLog`` on one Redis server (or one Cluster slot)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        blocking: redis.Redis,
        prefix: str,
        run_history: int,
        event_history: int,
        follow_keepalive: float,
        max_followers: int,
        probe: redis.Redis | None = None,
        acks: ReplicaAcks | None = None,
    ) -> None:
        self._redis = client
        self._event_history = event_history
        self._events_key = f"{prefix}events"
        self._probe = _probe_client(client) if probe is None else probe
        self._acks = acks  # commits wait for replicas (Sentinel's min_replicas)
        self._blocking = blocking  # for reads that wait: its read timeout outlasts them
        self._prefix = prefix
        self._run_history = run_history
        self._tasks_key = f"{prefix}tasks"
        self._due_key = f"{prefix}scheduled_tasks"
        self._claims_key = f"{prefix}claims"
        self._wake_channel = f"{prefix}wake"
        self._cancel_channel = f"{prefix}cancel"
        self._outbox_keys = OutboxKeys(
            f"{prefix}notify_due", f"{prefix}notify_entries", f"{prefix}notify_claims"
        )
        self._commit = Script(client, "commit")
        self._commit_chained = Script(client, "commit_chained", functions=("commit",))
        self._create_tasks = Script(client, "create_tasks")
        self._claim_due = Script(client, "claim_due")
        self._release_claims = Script(client, "release_claims")
        self._list_tasks = Script(client, "list_tasks")
        self._delete_unreadable = Script(client, "delete_unreadable")
        self._list_runs = Script(client, "list_runs")
        self._scheduled_entries = Script(client, "scheduled_entries")
        self._busy_tasks = Script(client, "busy_tasks")
        self._append_output = Script(client, "append_output")
        self._start_following_script = Script(client, "start_following")
        self._claim_notifications = Script(client, "claim_notifications")
        self._settle_notification = Script(client, "settle_notification")
        self._read_events_script = Script(client, "read_events")
        self._pubsub: PubSub | None = None
        self._followers = OutputFollowers(
            start=self._start_following,
            read_after=self._read_after,
            quiet=follow_keepalive,
            limit=max_followers,
        )
        self._event_followers = EventFollowers(
            read=self._read_events,
            newest=self._newest_event,
            wait_after=self._wait_for_events,
            quiet=follow_keepalive,
            limit=max_followers,
        )

    def task_key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    def runs_key(self, task_id: str) -> str:
        return f"{self._prefix}runs:{task_id}"

    def status_key(self, status: TaskStatus) -> str:
        return f"{self._prefix}status:{status}"

    def output_key(self, run_id: str) -> str:
        return f"{self._prefix}output:{run_id}"

    def records_key(self, run_id: str) -> str:
        return f"{self._prefix}notifications:{run_id}"

    @_translate_errors
    async def ping(self) -> None:
        await self._probe.ping()  # pyright: ignore[reportUnknownMemberType]

    @_translate_errors
    async def get_task(self, task_id: str) -> Task | None:
        doc = cast(bytes | None, await self._redis.get(self.task_key(task_id)))
        return None if doc is None else decode_task(task_id, doc)

    @_translate_errors
    async def get_tasks(self, task_ids: Sequence[str]) -> list[Task | None]:
        if not task_ids:
            return []
        # One MGET: a prefix's keys share one hash slot on a cluster (cluster_prefix).
        docs = cast(
            list[bytes | None],
            await self._redis.mget([self.task_key(task_id) for task_id in task_ids]),
        )
        return [readable_task(task_id, doc) for task_id, doc in zip(task_ids, docs, strict=True)]

    @_translate_errors
    async def list_tasks(
        self, *, status: TaskStatus | None, limit: int, after: str | None
    ) -> TaskPage:
        index = self._tasks_key if status is None else self.status_key(status)
        start = "-" if after is None else f"({after}"
        raw_ids, docs, more = cast(
            tuple[list[bytes], list[bytes | None], int],
            await self._list_tasks(ListTasksKeys(index), ListTasksArgs(self._prefix, start, limit)),
        )
        ids = [raw_id.decode() for raw_id in raw_ids]
        tasks: list[Task] = []
        unreadable: list[str] = []
        for task_id, doc in zip(ids, docs, strict=True):
            if doc is None:
                continue  # deleted between the index's read and the documents'
            task = readable_task(task_id, doc)
            if task is None:
                unreadable.append(task_id)
            else:
                tasks.append(task)
        return TaskPage(tasks, unreadable, after=ids[-1] if more else None)

    @_translate_errors
    async def scheduled_entries(
        self, *, until: float, offset: int, limit: int
    ) -> list[ScheduledEntry]:
        entries, docs = await self._scheduled_entries(
            ScheduledKeys(self._due_key), ScheduledArgs(self._prefix, repr(until), offset, limit)
        )
        pairs = cast(list[bytes], entries)
        return [
            ScheduledEntry(task_id.decode(), float(score), readable_task(task_id.decode(), doc))
            for task_id, score, doc in zip(
                pairs[::2], pairs[1::2], cast(list[bytes | None], docs), strict=True
            )
        ]

    @_translate_errors
    async def busy_tasks(self, *, limit: int) -> list[Task]:
        ids, docs = await self._busy_tasks(
            BusyKeys(self.status_key(TaskStatus.RUNNING), self._claims_key),
            BusyArgs(self._prefix, limit),
        )
        tasks = (
            readable_task(task_id.decode(), doc)
            for task_id, doc in zip(
                cast(list[bytes], ids), cast(list[bytes | None], docs), strict=True
            )
        )
        return [task for task in tasks if task is not None]

    @_translate_errors
    async def commit(self, change: TaskChange) -> None:
        if self._acks is not None:
            [result] = await self._pipelined(self._commit_scripts, self._queue_commits([change]))
        elif change.chained:
            keys, args = self._chained_call(change)
            result = await self._commit_chained(keys, ChainedArgs.layout(), *args)
        else:
            result = await self._commit(self._commit_keys(change), *self._commit_args(change))
        _raise_for(change, result)

    def _chained_call(self, change: TaskChange) -> tuple[tuple[str, ...], list[Any]]:
        """``commit_chained.lua``'s keys and its arguments after ``ChainedArgs``."""
        keys: list[str] = []
        args: list[Any] = []
        for each in (change, *change.chained):
            keys += self._commit_keys(each)
            commit_args, *docs = self._commit_args(each)
            args += [*commit_args, *docs]
        return tuple(keys), args

    @_translate_errors
    async def commit_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        """Apply each change atomically on its own, in one round trip; report which applied."""
        if not changes:
            return []
        results = await self._pipelined(self._commit_scripts, self._queue_commits(changes))
        return [result == b"ok" for result in results]

    @property
    def _commit_scripts(self) -> tuple[Script, ...]:
        return (self._commit, self._commit_chained)

    def _queue_commits(self, changes: Sequence[TaskChange]) -> Callable[[Pipeline], None]:
        def queue(pipe: Pipeline) -> None:
            for change in changes:
                if change.chained:
                    keys, args = self._chained_call(change)
                    self._commit_chained.queue(pipe, keys, ChainedArgs.layout(), *args)
                else:
                    self._commit.queue(pipe, self._commit_keys(change), *self._commit_args(change))

        return queue

    async def _pipelined(
        self, scripts: Sequence[Script], queue: Callable[[Pipeline], None]
    ) -> list[object]:
        """The replies to the script runs that ``queue`` adds to a pipeline, sent in one
        round trip (with the ``WAIT`` for replicas when commits need it)."""
        results = await self._send_pipeline(queue)
        if any(isinstance(result, NoScriptError) for result in results):
            # Redis lost the scripts: load them and send every change again, which is
            # safe as a commit already applied reports ``ok``.
            for script in scripts:
                await script.load()
            results = await self._send_pipeline(queue)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _send_pipeline(self, queue: Callable[[Pipeline], None]) -> list[object]:
        async with self._redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            if self._acks is not None:
                self._acks.queue(pipe)
            results: list[object] = await pipe.execute(raise_on_error=False)
        if self._acks is not None:
            await self._acks.check(self._redis, results.pop())
        return results

    @_translate_errors
    async def create_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        """All in one script call: one round trip, and one wake for the whole batch."""
        if not changes:
            return []
        writes = [_task_write(change) for change in changes]
        keys = CreateKeys(self._tasks_key, self._due_key, self._claims_key, self._events_key)
        args = CreateArgs(self._prefix, encode_list(writes), self._event_history)
        if self._acks is None:
            results = await self._create_tasks(keys, args)
        else:
            [results] = await self._pipelined(
                (self._create_tasks,), lambda pipe: self._create_tasks.queue(pipe, keys, args)
            )
        return [result == b"ok" for result in cast(list[bytes], results)]

    def _commit_keys(self, change: TaskChange) -> CommitKeys:
        return CommitKeys(
            task=self.task_key(change.task_id),
            tasks=self._tasks_key,
            due=self._due_key,
            claims=self._claims_key,
            runs=self.runs_key(change.task_id),
            notify_due=self._outbox_keys.due,
            notify_entries=self._outbox_keys.entries,
            events=self._events_key,
        )

    def _commit_args(self, change: TaskChange) -> tuple[CommitArgs, *tuple[bytes, ...]]:
        """The script's arguments, then each run's document on its own: a run carries its
        output (up to the output limit), which must not be copied and escaped again."""
        match change.schedule:
            case Keep():
                schedule, due_at = "keep", ""
            case Unschedule():
                schedule, due_at = "remove", ""
            case DueAt(when=when):
                schedule, due_at = "at", repr(when)
        task = change.task
        runs = [RunWrite(run.run_id, run.status in FINISHED_RUN_STATUSES) for run in change.runs]
        args = CommitArgs(
            prefix=self._prefix,
            task_id=change.task_id,
            expected_revision=""
            if change.expected_revision is None
            else str(change.expected_revision),
            doc=b"" if task is None else _encoder.encode(task),
            status="" if task is None else task.status.value,
            schedule=schedule,
            due_at=due_at,
            run_history=self._run_history,
            ended_output_ttl=ENDED_OUTPUT_TTL,
            notifications=_notification_writes(change.notifications),
            runs=encode_list(runs),
            event_history=self._event_history,
            events=_event_lines(change.events),
        )
        return (args, *(_encoder.encode(run) for run in change.runs))

    @_translate_errors
    async def get_run(self, task_id: str, run_id: str) -> Run | None:
        doc = await self._redis.hget(self.runs_key(task_id), run_id)  # type: ignore[misc]
        return None if doc is None else decode_run(task_id, run_id, cast(bytes, doc))

    @_translate_errors
    async def get_task_and_run(self, task_id: str, run_id: str) -> tuple[Task | None, Run | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.task_key(task_id))
            pipe.hget(self.runs_key(task_id), run_id)
            task_doc, run_doc = await pipe.execute()
        return (
            None if task_doc is None else decode_task(task_id, task_doc),
            None if run_doc is None else decode_run(task_id, run_id, run_doc),
        )

    @_translate_errors
    async def get_tasks_and_runs(
        self, pairs: Sequence[tuple[str, str]]
    ) -> list[tuple[Task | None, Run | None]]:
        if not pairs:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            self._queue_reads(pairs)(pipe)
            docs = await pipe.execute()
        return _decoded_pairs(pairs, docs)

    @_translate_errors
    async def read_and_commit_each(
        self, pairs: Sequence[tuple[str, str]], changes: Sequence[TaskChange]
    ) -> tuple[list[tuple[Task | None, Run | None]], list[bool]]:
        """The reads, then the commits, in one pipeline."""
        if not changes:
            return await self.get_tasks_and_runs(pairs), []
        reading, committing = self._queue_reads(pairs), self._queue_commits(changes)

        def queue(pipe: Pipeline) -> None:
            reading(pipe)
            committing(pipe)

        results = await self._pipelined(self._commit_scripts, queue)
        read = 2 * len(pairs)
        return (
            _decoded_pairs(pairs, results[:read]),
            [result == b"ok" for result in results[read:]],
        )

    def _queue_reads(self, pairs: Sequence[tuple[str, str]]) -> Callable[[Pipeline], None]:
        def queue(pipe: Pipeline) -> None:
            for task_id, run_id in pairs:
                pipe.get(self.task_key(task_id))
                pipe.hget(self.runs_key(task_id), run_id)

        return queue

    @_translate_errors
    async def delete_unreadable(
        self, task_id: str, document: bytes, *, events: Sequence[Event]
    ) -> list[str] | None:
        keys = DeleteUnreadableKeys(
            task=self.task_key(task_id),
            tasks=self._tasks_key,
            due=self._due_key,
            claims=self._claims_key,
            runs=self.runs_key(task_id),
            events=self._events_key,
        )
        args = DeleteUnreadableArgs(
            prefix=self._prefix,
            task_id=task_id,
            document=document,
            statuses=encode_list([status.value for status in TaskStatus]),
            event_history=self._event_history,
            events=_event_lines(events),
        )
        if self._acks is None:
            result = await self._delete_unreadable(keys, args)
        else:
            [result] = await self._pipelined(
                (self._delete_unreadable,),
                lambda pipe: self._delete_unreadable.queue(pipe, keys, args),
            )
        deleted, *run_ids = cast(list[Any], result)
        return [run_id.decode() for run_id in run_ids[0]] if deleted else None

    @_translate_errors
    async def list_runs(self, task_id: str, *, limit: int) -> RunHistory:
        run_ids, docs = cast(
            tuple[list[bytes], list[bytes | None]],
            await self._list_runs(ListRunsKeys(self.runs_key(task_id)), ListRunsArgs(limit)),
        )
        ids = [run_id.decode() for run_id in run_ids]
        return run_history(task_id, zip(ids, docs, strict=True))

    @_translate_errors
    async def claim_due(self, *, now: float, limit: int, lease: float, token: str) -> list[Claim]:
        flat = cast(
            list[bytes | None],
            await self._claim_due(
                ClaimKeys(self._due_key, self._claims_key),
                ClaimArgs(self._prefix, repr(now), limit, repr(now + lease), token),
            ),
        )
        claims: list[Claim] = []
        for raw_id, due, doc in zip(flat[::3], flat[1::3], flat[2::3], strict=True):
            assert raw_id is not None and due is not None
            task_id = raw_id.decode()
            task = None if doc is None else _claimed_task(task_id, doc)
            claims.append(Claim(task_id, task, float(due)))
        return claims

    @_translate_errors
    async def release_claims(self, *, token: str, task_ids: Sequence[str]) -> None:
        if task_ids:
            await self._release_claims(
                ClaimKeys(self._due_key, self._claims_key),
                ReleaseArgs(token, encode_list(list(task_ids))),
            )

    @_translate_errors
    async def count_due(self, *, now: float) -> int:
        return await self._redis.zcount(self._due_key, "-inf", repr(now))

    @_translate_errors
    async def extend_leases(self, task_ids: Sequence[str], *, until: float) -> None:
        if task_ids:
            await self._redis.zadd(self._due_key, dict.fromkeys(task_ids, until), xx=True)

    @_translate_errors
    async def claim_notifications(
        self, *, now: float, limit: int, lease: float, token: str
    ) -> list[OutboxEntry]:
        entries = await self._claim_notifications(
            self._outbox_keys, ClaimNotificationsArgs(repr(now), limit, repr(now + lease), token)
        )
        return [_entry_decoder.decode(entry) for entry in cast(list[bytes], entries)]

    @_translate_errors
    async def settle_notification(
        self, entry: OutboxEntry, *, token: str, retry_at: float | None
    ) -> None:
        await self._settle(entry, token, retry_at, _encoder.encode(entry.record))

    @_translate_errors
    async def drop_notification(self, entry: OutboxEntry, *, token: str) -> None:
        await self._settle(entry, token, None, b"")

    async def _settle(
        self, entry: OutboxEntry, token: str, retry_at: float | None, record: bytes
    ) -> None:
        note = entry.notification
        await self._settle_notification(
            SettleKeys(*self._outbox_keys, self.records_key(note.run_id)),
            SettleArgs(
                id=note.id,
                token=token,
                retry_at="" if retry_at is None else repr(retry_at),
                entry=b"" if retry_at is None else _encoder.encode(entry),
                event=note.event.value,
                record=record,
            ),
        )

    @_translate_errors
    async def next_notification_due(self) -> float | None:
        first = cast(
            list[tuple[bytes, float]],
            await self._redis.zrange(  # pyright: ignore[reportUnknownMemberType]
                self._outbox_keys.due, 0, 0, withscores=True
            ),
        )
        return first[0][1] if first else None

    @_translate_errors
    async def notification_records(
        self, run_ids: Sequence[str]
    ) -> dict[str, list[NotificationRecord]]:
        if not run_ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hgetall(self.records_key(run_id))
            found = cast(list[dict[bytes, bytes]], await pipe.execute())
        return {
            run_id: [
                _record_decoder.decode(records[event.encode()])
                for event in NotifyEvent
                if event.encode() in records
            ]
            for run_id, records in zip(run_ids, found, strict=True)
            if records
        }

    @_translate_errors
    async def append_output(self, run_id: str, chunk: OutputChunk, *, keep: int) -> None:
        await self._append_output(
            OutputKeys(self.output_key(run_id)),
            AppendArgs(chunk.offset, chunk.data, keep, LIVE_OUTPUT_TTL),
        )

    def follow(self, run_id: str) -> AbstractAsyncContextManager[AsyncIterator[OutputPage]]:
        return self._followers.follow(run_id)

    @_translate_errors
    async def _start_following(self, run_id: str) -> Read:
        entries = cast(
            list[tuple[bytes, list[bytes]]],
            await self._start_following_script(
                OutputKeys(self.output_key(run_id)), FollowArgs(LIVE_OUTPUT_TTL)
            ),
        )
        return read_result(
            (
                _output_entry(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                for entry_id, flat in entries
            ),
            cursor="0-0",
        )

    @_translate_errors
    async def _read_after(self, run_id: str, cursor: str, wait: float) -> Read:
        """Entries after ``cursor``; on the blocking client, whose read timeout is longer
        than the longest wait (``_MAX_BLOCK``)."""
        block = min(wait, _MAX_BLOCK)
        streams = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
            await self._blocking.xread(
                {self.output_key(run_id): cursor},
                count=_READ_PAGE_SIZE,
                block=max(1, round(block * 1000)) if block > 0 else None,
            ),
        )
        entries = streams[0][1] if streams else []
        return read_result((_output_entry(*entry) for entry in entries), cursor=cursor)

    @_translate_errors
    async def read_events(self, after: str | None, *, limit: int) -> EventBatch:
        batch = await self._read_events(after or "0-0", limit)
        return batch if after is not None else EventBatch(batch.events)

    def follow_events(
        self, after: str | None
    ) -> AbstractAsyncContextManager[AsyncIterator[EventBatch]]:
        return self._event_followers.follow(after)

    @_translate_errors
    async def _read_events(self, after: str, limit: int) -> EventBatch:
        entries, oldest = cast(
            tuple[list[tuple[bytes, list[bytes]]], bytes],
            await self._read_events_script(
                ReadEventsKeys(self._events_key), ReadEventsArgs(after, limit)
            ),
        )
        events = [_logged_event(entry_id, flat[1]) for entry_id, flat in entries]
        trimmed = oldest.decode() if oldest else None
        if trimmed is not None and event_key(after) < event_key(trimmed):
            return EventBatch(events, missed=trimmed)
        return EventBatch(events)

    @_translate_errors
    async def _newest_event(self) -> str:
        newest = cast(
            list[tuple[bytes, Any]],
            await self._redis.xrevrange(self._events_key, count=1),  # pyright: ignore[reportUnknownMemberType]
        )
        return newest[0][0].decode() if newest else "0-0"

    @_translate_errors
    async def _wait_for_events(self, after: str, wait: float) -> list[Event]:
        """Events after ``after``, waiting up to ``wait`` seconds for some; on the
        blocking client (see ``_read_after``)."""
        block = min(wait, _MAX_BLOCK)
        streams = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
            await self._blocking.xread(
                {self._events_key: after},
                count=PAGE_SIZE,
                block=max(1, round(block * 1000)) if block > 0 else None,
            ),
        )
        entries = streams[0][1] if streams else []
        return [_logged_event(entry_id, fields[b"e"]) for entry_id, fields in entries]

    @_translate_errors
    async def note_queues(self, queues: Sequence[str]) -> None:
        if queues:
            await self._redis.sadd(f"{self._prefix}queues", *queues)  # type: ignore[misc]

    @_translate_errors
    async def queues_in_use(self) -> list[str]:
        names = await self._redis.smembers(f"{self._prefix}queues")  # type: ignore[misc]
        return sorted(name.decode() for name in cast(set[bytes], names))

    @_translate_errors
    async def announce_cancel(self, run_id: str) -> None:
        await self._redis.publish(self._cancel_channel, run_id)  # pyright: ignore[reportUnknownMemberType]

    @asynccontextmanager
    async def cancel_notices(self) -> AsyncGenerator[AsyncIterator[str]]:
        pubsub = self._redis.pubsub()  # pyright: ignore[reportUnknownMemberType]
        try:
            try:
                await pubsub.subscribe(self._cancel_channel)
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(f"Redis: {exc}") from exc
            yield _notices(pubsub)
        finally:
            with anyio.move_on_after(1, shield=True), contextlib.suppress(*_UNAVAILABLE):
                await pubsub.aclose()

    async def wait_for_due(self, *, max_wait: float, ahead: float = 0.0) -> None:
        try:
            await self._wait_for_due(max_wait, ahead)
        except _UNAVAILABLE as exc:
            # The subscription died with its connection: subscribe afresh next time.
            pubsub, self._pubsub = self._pubsub, None
            if pubsub is not None:
                with anyio.move_on_after(1, shield=True), contextlib.suppress(*_UNAVAILABLE):
                    await pubsub.aclose()
            raise StoreUnavailable(f"Redis: {exc}") from exc

    async def _wait_for_due(self, max_wait: float, ahead: float) -> None:
        pubsub = await self._subscribed()
        # Drop notifications that arrived before we look at the earliest entry: the
        # look below sees what they announced.
        while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0):
            pass
        first = cast(
            list[tuple[bytes, float]],
            await self._redis.zrange(  # pyright: ignore[reportUnknownMemberType]
                self._due_key, 0, 0, withscores=True
            ),
        )
        earliest = first[0][1] if first else math.inf
        delay = min(max_wait, earliest - ahead - time.time())
        if delay > 0:
            await pubsub.get_message(ignore_subscribe_messages=True, timeout=delay)

    async def _subscribed(self) -> PubSub:
        if self._pubsub is None:
            pubsub = self._redis.pubsub()  # pyright: ignore[reportUnknownMemberType]
            await pubsub.subscribe(self._wake_channel)
            self._pubsub = pubsub
        return self._pubsub

    async def aclose(self) -> None:
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self._probe.aclose()
        await self._redis.aclose()


async def _notices(pubsub: PubSub) -> AsyncGenerator[str]:
    """The payloads published on a subscribed channel; ``StoreUnavailable`` if it drops."""
    while True:
        try:
            message = cast(
                dict[str, Any] | None,
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=None),
            )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc
        if message is not None:
            data = message["data"]
            yield data.decode() if isinstance(data, bytes) else str(data)


def _output_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> OutputEntry:
    """A live output stream entry, as followers read it (see the module docstring)."""
    if b"e" in fields:
        return entry_id.decode(), "end"
    if b"o" in fields:
        return entry_id.decode(), OutputChunk(int(fields[b"o"]), fields[b"d"])
    return entry_id.decode(), None


def _event_lines(events: Sequence[Event]) -> bytes:
    """Events as the scripts write them: JSON documents one a line (JSON never holds
    a raw newline), split in Lua without decoding them."""
    return b"\n".join(_encoder.encode(event) for event in events)


def _logged_event(entry_id: bytes, doc: bytes) -> Event:
    return _event_decoder.decode(doc).logged_as(entry_id.decode())


def _task_write(change: TaskChange) -> TaskWrite:
    """What ``create_tasks.lua`` writes for a change that creates a task."""
    task = change.task
    if change.expected_revision is not None or task is None or change.runs:
        raise ValueError(f"not the creation of a task: {change!r}")
    due_at = repr(change.schedule.when) if isinstance(change.schedule, DueAt) else ""
    return TaskWrite(
        task.id,
        _encoder.encode(task).decode(),
        task.status.value,
        due_at,
        _event_lines(change.events).decode(),
    )


def _decoded_pairs(
    pairs: Sequence[tuple[str, str]], docs: Sequence[object]
) -> list[tuple[Task | None, Run | None]]:
    """Each task and run document of a read's replies (task, run, task, run, ...) for
    its (task id, run id) ``pairs`` (``None`` for one that cannot be read)."""
    return [
        (
            readable_task(task_id, cast(bytes | None, task_doc)),
            readable_run(task_id, run_id, cast(bytes | None, run_doc)),
        )
        for (task_id, run_id), task_doc, run_doc in zip(pairs, docs[::2], docs[1::2], strict=True)
    ]


def _notification_writes(notifications: Sequence[Notification]) -> bytes:
    """``commit.lua``'s notifications argument: b"" when there are none (the common case,
    which then costs nothing)."""
    if not notifications:
        return b""
    writes: list[NotificationWrite] = []
    for notification in notifications:
        entry = new_entry(notification)
        writes.append(
            NotificationWrite(
                id=notification.id,
                run_id=notification.run_id,
                event=notification.event.value,
                due=repr(notification.due),
                entry=_encoder.encode(entry).decode(),
                record=_encoder.encode(entry.record).decode(),
            )
        )
    return encode_list(writes)


def _raise_for(change: TaskChange, result: object) -> None:
    if result == b"exists":
        raise TaskAlreadyExists(change.task_id)
    if result == b"conflict":
        raise RevisionConflict(change.task_id)


def _probe_client(client: redis.Redis) -> redis.Redis:
    """A client to ``client``'s server that tries a command once more at once (a pooled
    connection may have been closed by a restart) but does not wait out an outage: a
    ping then reports a refused connection at once, not after the retries."""
    pool = client.connection_pool
    options: dict[str, Any] = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), retries=1)}
    return redis.Redis.from_pool(
        redis.ConnectionPool(connection_class=pool.connection_class, **options)
    )


_COMMAND_TIMEOUT = 5.0
"""Seconds a command's answer may take before the connection counts as broken."""
_MAX_BLOCK = 30.0
"""Seconds a blocking read waits at most; the blocking client's read timeout is longer."""


@asynccontextmanager
async def open_redis_store(
    url: str,
    *,
    prefix: str,
    run_history: int,
    event_history: int = EVENT_HISTORY,
    follow_keepalive: float = FOLLOW_KEEPALIVE,
    max_followers: int = MAX_FOLLOWERS,
) -> AsyncGenerator[RedisStore]:
    """A ``RedisStore`` on clients that retry dropped connections with backoff.

    The timeouts are set here, not left to redis-py's defaults (which changed in 8.0, to
    a 5 s read timeout that cut a 10 s ``XREAD BLOCK``): commands answer within
    ``_COMMAND_TIMEOUT``, and reads that wait run on a client of their own whose read
    timeout outlasts the longest wait. Connections are named ``taskq-<pid>``
    (``CLIENT LIST`` shows which process holds which).
    """
    options: dict[str, Any] = {
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "socket_connect_timeout": _COMMAND_TIMEOUT,
        "health_check_interval": 30,
        "client_name": f"taskq-{os.getpid()}",
    }
    async with contextlib.AsyncExitStack() as stack:
        probe: redis.Redis | None = None
        acks: ReplicaAcks | None = None
        if url.startswith(f"{SENTINEL_SCHEME}://"):
            service = SentinelService.from_url(url)
            client, blocking, probe = await stack.enter_async_context(
                sentinel_clients(
                    service,
                    command_timeout=_COMMAND_TIMEOUT,
                    blocking_timeout=_MAX_BLOCK + _COMMAND_TIMEOUT,
                    **options,
                )
            )
            acks = service.acks
        else:
            client = redis.Redis.from_url(url, socket_timeout=_COMMAND_TIMEOUT, **options)  # pyright: ignore[reportUnknownMemberType]
            blocking = redis.Redis.from_url(  # pyright: ignore[reportUnknownMemberType]
                url, socket_timeout=_MAX_BLOCK + _COMMAND_TIMEOUT, **options
            )
        stack.push_async_callback(blocking.aclose)
        store = RedisStore(
            client,
            blocking=blocking,
            prefix=prefix,
            run_history=run_history,
            event_history=event_history,
            follow_keepalive=follow_keepalive,
            max_followers=max_followers,
            probe=probe,
            acks=acks,
        )
        stack.push_async_callback(store.aclose)
        yield store

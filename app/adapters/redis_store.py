"""The Redis store: ``Store`` on ``redis.asyncio``, one Lua script per atomic change.

Keys, all under the configured prefix (a ``{hash-tag}`` prefix keeps them in one
Redis Cluster slot, which the scripts need because they derive some key names):

- ``task:{id}``         string, the task document (msgspec JSON)
- ``tasks``             sorted set of every task id, all scores 0 (lexicographic paging)
- ``status:{status}``   sorted set of the ids in that status, scores 0
- ``scheduled_tasks``   sorted set, id -> due time (unix seconds); a claimed entry's
                        score is its lease expiry
- ``claims``            hash, id -> token of the scheduler holding the entry
- ``runs:{id}``         hash, run id -> run document (run ids sort by creation time)
- ``wake``              pub/sub channel: an entry earlier than every other was added
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
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from types import CoroutineType
from typing import Any, ParamSpec, TypeVar, cast

import anyio
import msgspec
import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.domain import (
    FINISHED_RUN_STATUSES,
    RevisionConflict,
    Run,
    Task,
    TaskAlreadyExists,
    TaskStatus,
)
from app.ports import (
    ENDED_OUTPUT_TTL,
    LIVE_OUTPUT_TTL,
    Claim,
    DueAt,
    Keep,
    OutputChunk,
    OutputPage,
    StoreUnavailable,
    TaskChange,
    Unschedule,
)

_NEWEST_FIELDS = """
-- The fields of a stream's newest entry, {} when there is none.
local function newest_fields(key)
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  return newest and newest[2] or {}
end
"""

_COMMIT = (
    _NEWEST_FIELDS
    + """
local task_key, tasks_key, due_key = KEYS[1], KEYS[2], KEYS[3]
local claims_key, runs_key = KEYS[4], KEYS[5]
local prefix, id, expected, doc, new_status = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local mode, score, history, ended_ttl = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]

local current = redis.call('GET', task_key)
if current and current == doc then
  return 'ok'  -- a resent script whose first attempt was applied
end
local old_status = nil
if expected == '' then
  if current then return 'exists' end
else
  if not current then return 'conflict' end
  local stored = cjson.decode(current)
  if tostring(stored.revision) ~= expected then return 'conflict' end
  old_status = stored.status
end

if doc == '' then
  redis.call('DEL', task_key, runs_key)
  redis.call('ZREM', tasks_key, id)
  redis.call('ZREM', prefix .. 'status:' .. old_status, id)
  redis.call('ZREM', due_key, id)
  redis.call('HDEL', claims_key, id)
  return 'ok'
end

redis.call('SET', task_key, doc)
if not old_status then
  redis.call('ZADD', tasks_key, 0, id)
end
if old_status ~= new_status then
  if old_status then
    redis.call('ZREM', prefix .. 'status:' .. old_status, id)
  end
  redis.call('ZADD', prefix .. 'status:' .. new_status, 0, id)
end

if #ARGV > 9 then
  for i = 10, #ARGV, 3 do
    local run_id, ended = ARGV[i], ARGV[i + 1]
    redis.call('HSET', runs_key, run_id, ARGV[i + 2])
    if ended == '1' then  -- end the run's live output, if someone follows or it printed
      local output_key = prefix .. 'output:' .. run_id
      local newest = newest_fields(output_key)[1]
      if newest and newest ~= 'e' then
        redis.call('XADD', output_key, '*', 'e', '1')
        redis.call('EXPIRE', output_key, ended_ttl)
      end
    end
  end
  local count = redis.call('HLEN', runs_key)
  if count > history then
    local run_ids = redis.call('HKEYS', runs_key)
    table.sort(run_ids)
    for i = 1, count - history do
      redis.call('HDEL', runs_key, run_ids[i])
    end
  end
end

if mode == 'remove' then
  redis.call('ZREM', due_key, id)
  redis.call('HDEL', claims_key, id)
elseif mode == 'at' then
  local first = redis.call('ZRANGE', due_key, 0, 0, 'WITHSCORES')
  redis.call('ZADD', due_key, score, id)
  redis.call('HDEL', claims_key, id)
  if #first == 0 or tonumber(score) < tonumber(first[2]) then
    redis.call('PUBLISH', prefix .. 'wake', score)
  end
end
return 'ok'
"""
)

_CLAIM_DUE = """
local due_key, claims_key = KEYS[1], KEYS[2]
local prefix, now, limit, lease_until, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ids = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0, limit)
local claimed = {}
for i, id in ipairs(ids) do
  redis.call('ZADD', due_key, lease_until, id)
  redis.call('HSET', claims_key, id, token)
  claimed[2 * i - 1] = id
  claimed[2 * i] = redis.call('GET', prefix .. 'task:' .. id)
end
return claimed
"""

_RELEASE_CLAIMS = """
local due_key, claims_key = KEYS[1], KEYS[2]
local token = ARGV[1]
for i = 2, #ARGV do
  if redis.call('HGET', claims_key, ARGV[i]) == token then
    redis.call('HDEL', claims_key, ARGV[i])
    redis.call('ZREM', due_key, ARGV[i])
  end
end
return 0
"""

_LIST_TASKS = """
local index_key = KEYS[1]
local prefix, start, limit = ARGV[1], ARGV[2], ARGV[3]
local ids = redis.call('ZRANGEBYLEX', index_key, start, '+', 'LIMIT', 0, limit)
if #ids == 0 then return {} end
local keys = {}
for i, id in ipairs(ids) do keys[i] = prefix .. 'task:' .. id end
return redis.call('MGET', unpack(keys))
"""

_LIST_RUNS = """
local run_ids = redis.call('HKEYS', KEYS[1])
if #run_ids == 0 then return {} end
table.sort(run_ids, function(a, b) return a > b end)
local newest = {}
for i = 1, math.min(#run_ids, tonumber(ARGV[1])) do newest[i] = run_ids[i] end
return redis.call('HMGET', KEYS[1], unpack(newest))
"""

_APPEND_OUTPUT = (
    _NEWEST_FIELDS
    + """
local key = KEYS[1]
local offset, data, keep, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local newest = newest_fields(key)
if newest[1] == 'e' then return 0 end  -- the run ended: its live output is final
if newest[1] == 'o' and offset < tonumber(newest[2]) + #newest[4] then
  return 0  -- these bytes are kept already: a resent chunk
end
local id = redis.call('XADD', key, '*', 'o', ARGV[1], 'd', data)
local stop = offset + #data
while true do
  local head = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
  if head[1] == id then break end
  local fields = head[2]
  if fields[1] == 'o' and stop - tonumber(fields[2]) <= keep then break end
  redis.call('XDEL', key, head[1])
end
redis.call('EXPIRE', key, ttl)
return 1
"""
)

_START_FOLLOWING = (
    _NEWEST_FIELDS
    + """
local key, ttl = KEYS[1], ARGV[1]
if newest_fields(key)[1] ~= 'e' then
  if redis.call('EXISTS', key) == 0 then
    redis.call('XADD', key, '*', 'f', '1')
  end
  redis.call('EXPIRE', key, ttl)
end
return redis.call('XRANGE', key, '-', '+')
"""
)

_READ_PAGE_SIZE = 100
"""Entries one ``read_output`` with a cursor returns at most."""

_task_decoder = msgspec.json.Decoder(Task)
_run_decoder = msgspec.json.Decoder(Run)
_encoder = msgspec.json.Encoder()


_P = ParamSpec("_P")
_T = TypeVar("_T")
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError)


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
    """Implements ``Store`` on one Redis server (or one Cluster slot)."""

    def __init__(self, client: redis.Redis, *, prefix: str, run_history: int) -> None:
        self._redis = client
        self._probe = _probe_client(client)
        self._prefix = prefix
        self._run_history = run_history
        self._tasks_key = f"{prefix}tasks"
        self._due_key = f"{prefix}scheduled_tasks"
        self._claims_key = f"{prefix}claims"
        self._wake_channel = f"{prefix}wake"
        self._cancel_channel = f"{prefix}cancel"
        self._commit = client.register_script(_COMMIT)
        self._claim_due = client.register_script(_CLAIM_DUE)
        self._release_claims = client.register_script(_RELEASE_CLAIMS)
        self._list_tasks = client.register_script(_LIST_TASKS)
        self._list_runs = client.register_script(_LIST_RUNS)
        self._append_output = client.register_script(_APPEND_OUTPUT)
        self._start_following = client.register_script(_START_FOLLOWING)
        self._pubsub: PubSub | None = None

    def task_key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    def runs_key(self, task_id: str) -> str:
        return f"{self._prefix}runs:{task_id}"

    def status_key(self, status: TaskStatus) -> str:
        return f"{self._prefix}status:{status}"

    def output_key(self, run_id: str) -> str:
        return f"{self._prefix}output:{run_id}"

    @_translate_errors
    async def ping(self) -> None:
        await self._probe.ping()  # pyright: ignore[reportUnknownMemberType]

    @_translate_errors
    async def get_task(self, task_id: str) -> Task | None:
        doc = await self._redis.get(self.task_key(task_id))
        return None if doc is None else _task_decoder.decode(doc)

    @_translate_errors
    async def list_tasks(
        self, *, status: TaskStatus | None, limit: int, after: str | None
    ) -> list[Task]:
        index = self._tasks_key if status is None else self.status_key(status)
        start = "-" if after is None else f"({after}"
        docs = await self._list_tasks(keys=[index], args=[self._prefix, start, limit])
        return [_task_decoder.decode(doc) for doc in cast(list[bytes | None], docs) if doc]

    @_translate_errors
    async def commit(self, change: TaskChange) -> None:
        result = await self._commit(keys=self._commit_keys(change), args=self._commit_args(change))
        _raise_for(change, result)

    @_translate_errors
    async def commit_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        """Apply each change atomically on its own, in one round trip; report which applied."""
        if not changes:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for change in changes:
                await self._commit(
                    keys=self._commit_keys(change), args=self._commit_args(change), client=pipe
                )
            results = await pipe.execute()
        return [result == b"ok" for result in results]

    def _commit_keys(self, change: TaskChange) -> list[str]:
        return [
            self.task_key(change.task_id),
            self._tasks_key,
            self._due_key,
            self._claims_key,
            self.runs_key(change.task_id),
        ]

    def _commit_args(self, change: TaskChange) -> list[Any]:
        match change.schedule:
            case Keep():
                mode, score = "keep", ""
            case Unschedule():
                mode, score = "remove", ""
            case DueAt(when=when):
                mode, score = "at", repr(when)
        expected = "" if change.expected_revision is None else str(change.expected_revision)
        task = change.task
        args: list[Any] = [
            self._prefix,
            change.task_id,
            expected,
            b"" if task is None else _encoder.encode(task),
            "" if task is None else task.status.value,
            mode,
            score,
            self._run_history,
            ENDED_OUTPUT_TTL,
        ]
        for run in change.runs:
            ended = 1 if run.status in FINISHED_RUN_STATUSES else 0
            args += [run.run_id, ended, _encoder.encode(run)]
        return args

    @_translate_errors
    async def get_run(self, task_id: str, run_id: str) -> Run | None:
        doc = await self._redis.hget(self.runs_key(task_id), run_id)  # type: ignore[misc]
        return None if doc is None else _run_decoder.decode(cast(bytes, doc))

    @_translate_errors
    async def get_task_and_run(self, task_id: str, run_id: str) -> tuple[Task | None, Run | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.task_key(task_id))
            pipe.hget(self.runs_key(task_id), run_id)
            task_doc, run_doc = await pipe.execute()
        return (
            None if task_doc is None else _task_decoder.decode(task_doc),
            None if run_doc is None else _run_decoder.decode(run_doc),
        )

    @_translate_errors
    async def list_runs(self, task_id: str, *, limit: int) -> list[Run]:
        docs = await self._list_runs(keys=[self.runs_key(task_id)], args=[limit])
        return [_run_decoder.decode(doc) for doc in cast(list[bytes | None], docs) if doc]

    @_translate_errors
    async def claim_due(self, *, now: float, limit: int, lease: float, token: str) -> list[Claim]:
        flat = cast(
            list[bytes | None],
            await self._claim_due(
                keys=[self._due_key, self._claims_key],
                args=[self._prefix, repr(now), limit, repr(now + lease), token],
            ),
        )
        claims: list[Claim] = []
        for raw_id, doc in zip(flat[::2], flat[1::2], strict=True):
            assert raw_id is not None
            task = None if doc is None else _task_decoder.decode(doc)
            claims.append(Claim(raw_id.decode(), task))
        return claims

    @_translate_errors
    async def release_claims(self, *, token: str, task_ids: Sequence[str]) -> None:
        if task_ids:
            await self._release_claims(
                keys=[self._due_key, self._claims_key], args=[token, *task_ids]
            )

    @_translate_errors
    async def extend_leases(self, task_ids: Sequence[str], *, until: float) -> None:
        if task_ids:
            await self._redis.zadd(self._due_key, dict.fromkeys(task_ids, until), xx=True)

    @_translate_errors
    async def append_output(self, run_id: str, chunk: OutputChunk, *, keep: int) -> None:
        await self._append_output(
            keys=[self.output_key(run_id)],
            args=[chunk.offset, chunk.data, keep, LIVE_OUTPUT_TTL],
        )

    @_translate_errors
    async def read_output(self, run_id: str, *, cursor: str | None, wait: float) -> OutputPage:
        key = self.output_key(run_id)
        if cursor is None:
            entries = cast(
                list[tuple[bytes, list[bytes]]],
                await self._start_following(keys=[key], args=[LIVE_OUTPUT_TTL]),
            )
            return _output_page(
                (
                    (entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                    for entry_id, flat in entries
                ),
                cursor="0-0",
            )
        streams = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
            await self._redis.xread(
                {key: cursor},
                count=_READ_PAGE_SIZE,
                block=max(1, round(wait * 1000)) if wait > 0 else None,
            ),
        )
        return _output_page(streams[0][1] if streams else [], cursor=cursor)

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

    async def wait_for_due(self, *, max_wait: float) -> None:
        try:
            await self._wait_for_due(max_wait)
        except _UNAVAILABLE as exc:
            # The subscription died with its connection: subscribe afresh next time.
            pubsub, self._pubsub = self._pubsub, None
            if pubsub is not None:
                with anyio.move_on_after(1, shield=True), contextlib.suppress(*_UNAVAILABLE):
                    await pubsub.aclose()
            raise StoreUnavailable(f"Redis: {exc}") from exc

    async def _wait_for_due(self, max_wait: float) -> None:
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
        delay = min(max_wait, earliest - time.time())
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


def _output_page(entries: Iterable[tuple[bytes, dict[bytes, bytes]]], *, cursor: str) -> OutputPage:
    """The page of stream ``entries`` read after ``cursor``: its chunks, up to an end mark."""
    chunks: list[OutputChunk] = []
    for entry_id, fields in entries:
        cursor = entry_id.decode()
        if b"e" in fields:
            return OutputPage(chunks, cursor, ended=True)
        if b"o" in fields:
            chunks.append(OutputChunk(int(fields[b"o"]), fields[b"d"]))
    return OutputPage(chunks, cursor, ended=False)


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


@asynccontextmanager
async def open_redis_store(
    url: str, *, prefix: str, run_history: int
) -> AsyncGenerator[RedisStore]:
    """A ``RedisStore`` on a client that retries dropped connections with backoff."""
    client = redis.Redis.from_url(  # pyright: ignore[reportUnknownMemberType]
        url,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    store = RedisStore(client, prefix=prefix, run_history=run_history)
    try:
        yield store
    finally:
        await store.aclose()

"""The Redis store's Lua scripts (``lua/*.lua``, package data) and their argument layout.

Each script takes its KEYS and ARGV in the order of the fields of its ``...Keys`` and
``...Args`` tuples below, the one place that layout is named on this side; each script
reads them into locals of the same names on its first lines. A list travels as one JSON
array argument, never as a run of positional values.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as redis
from redis.asyncio.client import Pipeline

_LIBRARY = ("newest_fields.lua", "stored_tasks.lua")
"""Lua functions prepended to every script (Redis has no ``require``)."""


class CommitKeys(NamedTuple):
    task: str
    tasks: str
    due: str
    claims: str
    runs: str
    notify_due: str
    notify_entries: str
    events: str


class RunWrite(msgspec.Struct, frozen=True):
    """A run record ``commit.lua`` writes; ``ended`` also ends the run's live output.
    Its document travels as an argument of its own, after ``CommitArgs``."""

    run_id: str
    ended: bool


class CommitArgs(NamedTuple):
    prefix: str
    task_id: str
    expected_revision: str  # "" when the task must not exist yet
    doc: bytes  # the new task document; b"" deletes the task
    status: str  # the new document's status ("" when deleting)
    schedule: str  # "keep", "remove" or "at"
    due_at: str  # with "at": the entry's score
    run_history: int
    ended_output_ttl: int
    notifications: bytes  # JSON array of NotificationWrite; b"" for none
    runs: bytes  # JSON array of RunWrite; each run's document follows, in order
    event_history: int  # events the event log keeps at least
    events: bytes  # the change's events (JSON documents), one a line


class ChainedArgs(NamedTuple):
    """``commit_chained.lua``'s first arguments: how to read each change's own (its
    ``CommitKeys`` and ``CommitArgs``, then its runs' documents) from what follows."""

    keys_per_change: int
    args_per_change: int
    runs_arg: int  # 1-based position of ``runs`` in ``CommitArgs``
    revision_arg: int  # of ``expected_revision``
    doc_arg: int  # of ``doc``

    @classmethod
    def layout(cls) -> ChainedArgs:
        return cls(
            keys_per_change=len(CommitKeys._fields),
            args_per_change=len(CommitArgs._fields),
            runs_arg=CommitArgs._fields.index("runs") + 1,
            revision_arg=CommitArgs._fields.index("expected_revision") + 1,
            doc_arg=CommitArgs._fields.index("doc") + 1,
        )


class NotificationWrite(msgspec.Struct, frozen=True):
    """A notification ``commit.lua`` puts in the outbox: its entry (JSON) due at ``due``
    (a string: Lua's JSON numbers keep only 14 digits), and its pending ``record`` kept
    in its run's records (``notifications:{run id}``) under its ``event``."""

    id: str
    run_id: str
    event: str
    due: str
    entry: str
    record: str


class OutboxKeys(NamedTuple):
    due: str
    entries: str
    claims: str


class ClaimNotificationsArgs(NamedTuple):
    now: str
    limit: int
    lease_until: str
    token: str


class SettleKeys(NamedTuple):
    due: str
    entries: str
    claims: str
    records: str  # the run's notification records


class SettleArgs(NamedTuple):
    id: str
    token: str
    retry_at: str  # "" removes the entry from the outbox
    entry: bytes  # the entry due again at retry_at
    event: str
    record: bytes  # b"" removes the record


class CreateKeys(NamedTuple):
    tasks: str
    due: str
    claims: str
    events: str


class TaskWrite(msgspec.Struct, frozen=True):
    """A new task ``create_tasks.lua`` writes; ``due_at`` is its ``scheduled_tasks`` score,
    "" for none (a string: Lua's JSON numbers keep only 14 digits)."""

    id: str
    doc: str
    status: str
    due_at: str
    events: str  # its events (JSON documents), one a line


class CreateArgs(NamedTuple):
    prefix: str
    tasks: bytes  # JSON array of TaskWrite
    event_history: int


class ReadEventsKeys(NamedTuple):
    events: str


class ReadEventsArgs(NamedTuple):
    after: str  # an event id
    limit: int


class ClaimKeys(NamedTuple):
    due: str
    claims: str


class ClaimArgs(NamedTuple):
    prefix: str
    now: str
    limit: int
    lease_until: str
    token: str


class ReleaseArgs(NamedTuple):
    token: str
    task_ids: bytes  # JSON array of ids


class ListTasksKeys(NamedTuple):
    index_key: str


class ListTasksArgs(NamedTuple):
    prefix: str
    start: str  # ZRANGEBYLEX start: "-" or "(" + the id to start after
    limit: int


class DeleteUnreadableKeys(NamedTuple):
    task: str
    tasks: str
    due: str
    claims: str
    runs: str
    events: str


class DeleteUnreadableArgs(NamedTuple):
    prefix: str
    task_id: str
    document: bytes  # the bytes read: deleted only while they are still stored
    statuses: bytes  # JSON array of every task status (the indexes it may be in)
    event_history: int  # events the event log keeps at least
    events: bytes  # the deletion's events (JSON documents), one a line


class BusyKeys(NamedTuple):
    running: str  # status:running
    claims: str


class BusyArgs(NamedTuple):
    prefix: str
    limit: int


class ScheduledKeys(NamedTuple):
    due: str


class ScheduledArgs(NamedTuple):
    prefix: str
    until: str  # the highest score, as ZRANGEBYSCORE reads it
    offset: int
    limit: int


class ListRunsKeys(NamedTuple):
    runs: str


class ListRunsArgs(NamedTuple):
    limit: int


class OutputKeys(NamedTuple):
    output: str


class AppendArgs(NamedTuple):
    offset: int
    data: bytes
    keep: int
    ttl: int


class FollowArgs(NamedTuple):
    ttl: int


def encode_list(items: list[Any]) -> bytes:
    """A list argument, as the scripts ``cjson.decode`` it."""
    return msgspec.json.encode(items)


class Script:
    """One of the Lua scripts, registered on a client (run by SHA, loaded when missing)."""

    def __init__(self, client: redis.Redis, name: str, *, functions: tuple[str, ...] = ()) -> None:
        """``functions``: other scripts the script calls, each as a Lua function of the
        same name taking ``(KEYS, ARGV)`` (``commit`` becomes ``commit_one``)."""
        lua = files(__package__ or "app.adapters") / "lua"
        parts = [(lua / library).read_text() for library in _LIBRARY]
        for function in functions:
            body = (lua / f"{function}.lua").read_text()
            parts.append(f"local function {function}_one(KEYS, ARGV)\n{body}\nend")
        parts.append((lua / f"{name}.lua").read_text())
        self._script = client.register_script("\n".join(parts))

    async def __call__(self, keys: tuple[str, ...], args: NamedTuple, *more: Any) -> Any:
        """Run the script; ``more`` are arguments after ``args`` (documents passed as
        they are, not inside another JSON document where each escape would grow)."""
        return await self._script(keys=list(keys), args=[*args, *more])

    def queue(self, pipe: Pipeline, keys: tuple[str, ...], args: NamedTuple, *more: Any) -> None:
        """Add a run to ``pipe`` by SHA alone: unlike a script registered with the
        pipeline, it costs no ``SCRIPT EXISTS`` round trip before each batch. Where Redis
        lost the script (restart, ``SCRIPT FLUSH``) the pipeline's reply for it is a
        ``NoScriptError``: ``load`` it and send again."""
        pipe.evalsha(self._script.sha, len(keys), *keys, *args, *more)

    async def load(self) -> None:
        await self._script.registered_client.script_load(self._script.script)

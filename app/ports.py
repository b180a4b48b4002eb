"""The ports every role talks through: the store's (``TaskStore`` for task state,
``CancelNotices``, ``LiveOutput``, ``NotificationOutbox``, ``EventLog``; ``Store`` is all
five) and ``Broker`` (dispatch).

Each has a real adapter (Redis, AMQP) and an in-memory one that is the reference
behaviour; the contract suites in ``tests/contract`` run both through the same cases.
Roles are typed against the ports they use.
Opening and closing connections is not part of a port: see ``app.adapters``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import msgspec

# The schedule-entry vocabulary is the domain's; adapters and tests reach it here too.
from app.domain import DEFAULT_QUEUE as DEFAULT_QUEUE
from app.domain import KEEP as KEEP
from app.domain import UNSCHEDULE as UNSCHEDULE
from app.domain import DueAt as DueAt
from app.domain import Keep as Keep
from app.domain import Run, ScheduleChange, Task, TaskStatus, Transition
from app.domain import Unschedule as Unschedule
from app.events import Event, lifecycle_events
from app.notifications import Notification, NotificationRecord, OutboxEntry, notifications_for


class StoreUnavailable(Exception):
    """The store cannot be reached right now; the operation may be retried later."""


class BrokerUnavailable(Exception):
    """The broker cannot be reached right now; the operation may be retried later."""


@dataclass(frozen=True, slots=True)
class TaskChange:
    """One atomic change of a task, applied by ``Store.commit`` or not at all.

    ``expected_revision`` is the revision the change was computed from (``None``: the
    task must not exist yet). ``task`` is the new document (``None`` deletes the task,
    its runs and its schedule). ``runs`` are run records to write alongside. Any change
    to the schedule also invalidates a scheduler's claim on the task. ``notifications``
    go into the outbox (``NotificationOutbox``), each with a pending record on its run.
    ``events`` go to the event log (``EventLog``) in the same step. ``chained`` are
    changes of other tasks committed in the same step, all or none (the runs a run's end
    triggers, ``app.chains``): each is checked against its own expected revision.
    """

    task_id: str
    expected_revision: int | None
    task: Task | None
    runs: Sequence[Run] = ()
    schedule: ScheduleChange = field(default=KEEP)
    notifications: Sequence[Notification] = ()
    events: Sequence[Event] = ()
    chained: Sequence[TaskChange] = ()

    @classmethod
    def of(cls, transition: Transition) -> TaskChange:
        """The change that commits ``transition``, checked against the revision it was
        computed from."""
        before = transition.before
        return cls(
            task_id=transition.task_id,
            expected_revision=None if before is None else before.revision,
            task=transition.after,
            runs=transition.runs,
            schedule=transition.schedule,
            notifications=notifications_for(transition),
            events=lifecycle_events(transition),
        )


@dataclass(frozen=True, slots=True)
class Claim:
    """A due task a scheduler leased from ``scheduled_tasks``; ``task`` is ``None`` if gone.
    ``due`` is the entry's time before the claim (unix seconds)."""

    task_id: str
    task: Task | None
    due: float


@dataclass(frozen=True, slots=True)
class TaskPage:
    """Entries of a task index read in id order (``TaskStore.list_tasks``): the tasks
    among them, the ids among them whose document cannot be read (``UnreadableTask``:
    left out of ``tasks``), and ``after``, the last id read, when entries follow it
    (``None``: the index ends here)."""

    tasks: Sequence[Task]
    unreadable: Sequence[str] = ()
    after: str | None = None


MAX_UNREADABLE_NAMED = 20
"""The most unreadable documents one answer names: a page of ``GET /tasks``
(``X-Unreadable-Tasks``), a list of runs (``X-Unreadable-Runs``, and the warning of
``list_runs``, which counts them all). Clients refuse long headers."""


@dataclass(frozen=True, slots=True)
class RunHistory:
    """A task's most recent runs, newest first (``TaskStore.list_runs``), and the ids of
    the runs among them whose document cannot be read (``UnreadableRun``: left out of
    ``runs``)."""

    runs: Sequence[Run]
    unreadable: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class ScheduledEntry:
    """An entry of ``scheduled_tasks`` with its task (``None`` if gone, or unreadable).
    ``score`` (unix seconds) is when something must happen to the task: its next due
    time while it is idle, else its run's claim, lease or retry (see ``Transition``)."""

    task_id: str
    score: float
    task: Task | None


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """Bytes a running command printed, starting at byte ``offset`` of its output."""

    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OutputPage:
    """Live output a follower has not seen yet: chunks in order, and whether the run's end
    has been recorded (no chunk comes after it)."""

    chunks: Sequence[OutputChunk]
    ended: bool


class TooManyFollowers(Exception):
    """This process follows as many live outputs (or event logs) as it may
    (``TASKQ_MAX_FOLLOWERS``); try again later or elsewhere."""

    def __init__(self, limit: int, what: str = "live outputs") -> None:
        super().__init__(f"this server already streams {limit} {what}; try again shortly")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events of the event log in order, each with its id. ``missed`` is set (to the
    oldest event kept) when events after the point read from were dropped from the log
    before they could be read: the reader missed some and should reload its state."""

    events: Sequence[Event]
    missed: str | None = None


class TaskStore(Protocol):
    """Where tasks, their runs and their schedule live, changed one task at a time.

    Every method raises ``StoreUnavailable`` when the store cannot be reached.

    A stored task document that cannot be read (a hand edit, another version's format)
    is neither a task nor gone: ``get_task`` and ``get_task_and_run`` raise
    ``UnreadableTask``; the reads of many tasks at once (``get_tasks``,
    ``get_tasks_and_runs``, ``read_and_commit_each``, ``scheduled_entries``,
    ``busy_tasks``, ``claim_due``) give ``None`` for it or leave it out, logging a
    warning that names it; ``list_tasks`` names it in its page. A change checked against
    a revision conflicts with it, and only ``delete_unreadable`` removes it.

    A stored run document that cannot be read is handled the same way: ``get_run`` and
    ``get_task_and_run`` raise ``UnreadableRun``; ``get_tasks_and_runs`` and
    ``read_and_commit_each`` give ``None`` for it, with a warning naming it;
    ``list_runs`` leaves it out and names it in ``RunHistory.unreadable``. A commit that
    writes the run replaces it.
    """

    async def ping(self) -> None:
        """Raise if the store cannot be reached."""
        ...

    async def get_task(self, task_id: str) -> Task | None:
        """The task, or ``None``; ``UnreadableTask`` when its document cannot be read."""
        ...

    async def get_tasks(self, task_ids: Sequence[str]) -> list[Task | None]:
        """``get_task`` for each id, in order, all in one round trip where the store can
        (``None`` for a document that cannot be read)."""
        ...

    async def list_tasks(
        self, *, status: TaskStatus | None, limit: int, after: str | None
    ) -> TaskPage:
        """The next ``limit`` entries of the index of every task (or of the tasks in
        ``status``) after the id ``after``, in id order, read in one step.

        A page counts the entries it read, not the tasks it holds: it holds fewer than
        ``limit`` when some documents cannot be read or were deleted as it was read, and
        more may follow all the same. Go on from its ``after`` until that is ``None``.
        """
        ...

    async def scheduled_entries(
        self, *, until: float, offset: int, limit: int
    ) -> list[ScheduledEntry]:
        """Up to ``limit`` entries of ``scheduled_tasks`` with a score up to ``until``, in
        score order (ties in id order), skipping the first ``offset`` of them, each with
        its task read in the same step."""
        ...

    async def busy_tasks(self, *, limit: int) -> list[Task]:
        """Up to ``limit`` of the tasks whose entry in ``scheduled_tasks`` is not their
        next due time: the running ones (it is their run's lease) and those a scheduler
        holds a claim on (it is the claim's expiry); read in one step."""
        ...

    async def commit(self, change: TaskChange) -> None:
        """Apply ``change`` atomically.

        Raises ``TaskAlreadyExists`` when creating an existing id and ``RevisionConflict``
        when the stored revision is not ``change.expected_revision`` (or the task is gone).
        A change recording the end of a run also ends that run's live output
        (``LiveOutput.follow``) in the same step.
        """
        ...

    async def commit_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        """Apply each change atomically on its own (in one round trip where the store
        can); report which were applied. A conflict or an existing id is ``False``.

        Sending a change again after ``StoreUnavailable`` is safe: one that was applied
        (its answer lost) reports ``True`` instead of a conflict.
        """
        ...

    async def create_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        """Create each new task (changes with no expected revision, a document and no
        runs) atomically on its own, in one step where the store can; report which were
        created. ``False``: the id was taken, already stored or by an earlier change of
        the same call. Schedulers waiting in ``wait_for_due`` are woken at most once."""
        ...

    async def get_run(self, task_id: str, run_id: str) -> Run | None:
        """One run of a task, or ``None``; ``UnreadableRun`` when its document cannot be
        read."""
        ...

    async def get_task_and_run(self, task_id: str, run_id: str) -> tuple[Task | None, Run | None]:
        """The task and one of its runs, read together (one round trip where possible);
        ``UnreadableTask`` when the task's document cannot be read, else ``UnreadableRun``
        when the run's cannot."""
        ...

    async def get_tasks_and_runs(
        self, pairs: Sequence[tuple[str, str]]
    ) -> list[tuple[Task | None, Run | None]]:
        """``get_task_and_run`` for each (task id, run id) pair, in order, all in one
        round trip where the store can (a task or a run whose document cannot be read:
        ``None``)."""
        ...

    async def read_and_commit_each(
        self, pairs: Sequence[tuple[str, str]], changes: Sequence[TaskChange]
    ) -> tuple[list[tuple[Task | None, Run | None]], list[bool]]:
        """``get_tasks_and_runs(pairs)`` and ``commit_each(changes)`` together, in one
        round trip where the store can: the reads see the store as it was before these
        commits. Either both answer or the call raises (``StoreUnavailable``: some of
        the commits may have been applied, and sending them again is safe)."""
        ...

    async def list_runs(self, task_id: str, *, limit: int) -> RunHistory:
        """The task's ``limit`` most recent runs, newest first, read in one step; those
        whose document cannot be read are left out of ``runs`` (the history then holds
        fewer) and named in ``unreadable``."""
        ...

    async def delete_unreadable(
        self, task_id: str, document: bytes, *, events: Sequence[Event]
    ) -> list[str] | None:
        """Delete a task whose stored document cannot be read (``UnreadableTask``), as
        long as it still is ``document``: what ``commit`` deletes with a task goes too
        (its runs, its entries in every index and in ``scheduled_tasks``), and
        ``events`` go to the event log in the same step. The ids of the runs deleted;
        ``None`` (nothing deleted) when the stored document is not ``document`` (it
        changed since it was read, or it is gone)."""
        ...

    async def claim_due(self, *, now: float, limit: int, lease: float, token: str) -> list[Claim]:
        """Atomically lease up to ``limit`` entries of ``scheduled_tasks`` due at ``now``.

        A leased entry is due again at ``now + lease`` unless ``release_claims`` removes
        it first, so a scheduler that dies after claiming loses nothing. Two callers
        never lease the same entry at the same time.
        """
        ...

    async def release_claims(self, *, token: str, task_ids: Sequence[str]) -> None:
        """Remove the entries this ``token`` still holds (dispatch is done)."""
        ...

    async def extend_leases(self, task_ids: Sequence[str], *, until: float) -> None:
        """Move the ``scheduled_tasks`` entries of these running tasks to ``until``.

        A running task's entry is its run's lease: a consumer renews it while the command
        runs, and a scheduler that finds it due knows the run was lost. Ids without an
        entry are left without one.
        """
        ...

    async def count_due(self, *, now: float) -> int:
        """How many entries of ``scheduled_tasks`` are due at ``now`` and not claimed
        (a claim or a run's lease moves its entry to when it ends), read cheaply."""
        ...

    async def wait_for_due(self, *, max_wait: float, ahead: float = 0.0) -> None:
        """Return ``ahead`` seconds before the earliest entry of ``scheduled_tasks`` is
        due, when one may have been added earlier than that (in any process), or after
        ``max_wait`` seconds."""
        ...


class CancelNotices(Protocol):
    """Tells every consumer, in any process, which commands to stop."""

    async def announce_cancel(self, run_id: str) -> None:
        """Tell every consumer listening now to stop the command of this run.

        Raises ``StoreUnavailable`` when the notice cannot be sent."""
        ...

    def cancel_notices(self) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """The ids of runs whose command must stop, announced from now on; the iterator
        raises ``StoreUnavailable`` when the notices stop coming (listen again)."""
        ...


class LiveOutput(Protocol):
    """What running commands print, kept for a while so that anyone can follow it live.

    A view, never the record: the run (``TaskStore``) keeps the output that counts.
    Both methods raise ``StoreUnavailable`` when the store cannot be reached.
    """

    async def append_output(self, run_id: str, chunk: OutputChunk, *, keep: int) -> None:
        """Add output of a running command to its run's live output.

        Chunks come in offset order; one that starts before the end of the newest chunk
        kept is a resend and is ignored, as is anything after the run's end. The live
        output keeps the newest ``keep`` bytes, dropping whole chunks from the oldest
        (the newest chunk always stays), and expires ``LIVE_OUTPUT_TTL`` after the last
        write if nobody records the run's end.
        """
        ...

    def follow(self, run_id: str) -> AbstractAsyncContextManager[AsyncIterator[OutputPage]]:
        """Follow the live output of a run: pages of chunks not seen yet, never repeating.

        The first page comes at once, with every chunk kept; from then on the commit that
        ends the run ends its live output (a page with ``ended``, after which the iterator
        stops), even if the command never printed anything. Read the run itself after
        that first page: a run that ended before it gets no end. Later pages come as
        output does, and an empty page whenever nothing came for the store's quiet
        interval (``FOLLOW_KEEPALIVE`` by default), so a follower can check on the run.

        Raises ``TooManyFollowers`` on entry when this process already follows its
        limit of live outputs (followers of one run share one read of the store).
        """
        ...


class NotificationOutbox(Protocol):
    """Notifications waiting for delivery, written by ``TaskStore.commit`` with the change
    that causes them, and how each one's delivery went (the records a run shows).

    Any number of notifiers may deliver from one outbox: a claimed entry is leased to
    one of them at a time, and comes back when the lease ends unless it is settled.
    The records of a run go with it (deleted with its task, or dropped from its run
    history).
    Every method raises ``StoreUnavailable`` when the store cannot be reached.
    """

    async def claim_notifications(
        self, *, now: float, limit: int, lease: float, token: str
    ) -> list[OutboxEntry]:
        """Lease up to ``limit`` entries due at ``now`` (unix seconds), earliest first,
        until ``now + lease``; two callers never hold the same entry at once."""
        ...

    async def settle_notification(
        self, entry: OutboxEntry, *, token: str, retry_at: float | None
    ) -> None:
        """Record ``entry.record`` on its run and, with ``retry_at``, put the entry back
        in the outbox due then (as ``entry``), else remove it. Nothing happens when
        ``token`` no longer holds the entry (its lease ran out and another notifier took
        it), nor to the record when its run or task is gone."""
        ...

    async def drop_notification(self, entry: OutboxEntry, *, token: str) -> None:
        """Remove ``entry`` from the outbox and its record from its run, unsent (a
        still-running notification for a run that ended); as ``settle_notification``,
        only while ``token`` holds it."""
        ...

    async def next_notification_due(self) -> float | None:
        """When the earliest entry of the outbox is due (unix seconds), if any."""
        ...

    async def notification_records(
        self, run_ids: Sequence[str]
    ) -> dict[str, list[NotificationRecord]]:
        """The records of these runs, by run id (runs without any left out), in
        ``NotifyEvent`` order."""
        ...


class EventLog(Protocol):
    """The lifecycle events of every task (``app.events``), in the order they happened:
    each commit writes its change's events in the same step, so an event is never seen
    for a change that did not happen. The log keeps at least the newest
    ``TASKQ_EVENT_HISTORY`` events (a few more while it trims in steps).

    Event ids are increasing strings (``1732838400000-0``); ``after`` is such an id,
    validated by the caller (``app.events.event_key``). Both methods raise
    ``StoreUnavailable`` when the store cannot be reached.
    """

    async def read_events(self, after: str | None, *, limit: int) -> EventBatch:
        """Up to ``limit`` events after the id ``after`` (``None``: from the oldest kept),
        oldest first, with ``missed`` set when events after ``after`` are gone."""
        ...

    def follow_events(
        self, after: str | None
    ) -> AbstractAsyncContextManager[AsyncIterator[EventBatch]]:
        """Follow the event log from after the id ``after`` (``None``: from now on):
        batches of events not seen yet, never repeating or skipping one; the first says
        ``missed`` if events after ``after`` are gone (it then starts from the oldest
        kept), as does a later one if the follower fell so far behind that the log
        dropped events before it read them. An empty batch comes whenever nothing
        happened for the store's quiet interval (``FOLLOW_KEEPALIVE`` by default).

        The point to follow from is fixed on entry. Raises ``TooManyFollowers`` on entry
        when this process already follows its limit of event logs (every follower in
        a process shares one read of the store).
        """
        ...


class QueueDirectory(Protocol):
    """The taskq queues in use (named by a task, or served by a consumer), so that
    ``/health`` knows which to ask the broker about. Names are only ever added."""

    async def note_queues(self, queues: Sequence[str]) -> None:
        """Remember these queues as in use; raises ``StoreUnavailable``."""
        ...

    async def queues_in_use(self) -> list[str]:
        """Every queue noted so far, sorted; raises ``StoreUnavailable``."""
        ...


class Store(
    TaskStore, CancelNotices, LiveOutput, NotificationOutbox, EventLog, QueueDirectory, Protocol
):
    """Every store port at once: what ``open_store`` opens (one connection for all)."""


LIVE_OUTPUT_TTL = 3600
"""Seconds a run's live output outlives its last write when its end is never recorded."""
ENDED_OUTPUT_TTL = 60
"""Seconds a run's live output stays once its end is recorded (followers read the end)."""
FOLLOW_KEEPALIVE = 10.0
"""Seconds without output after which ``LiveOutput.follow`` hands out an empty page."""
MAX_FOLLOWERS = 1000
"""Live outputs one process follows at most (``TASKQ_MAX_FOLLOWERS``), and event log
followers at most."""
EVENT_HISTORY = 10_000
"""Events the event log keeps at least (``TASKQ_EVENT_HISTORY``)."""


DELIVERY_LIMIT = 5
"""Times a message may go back to the queue (requeued, or left unsettled by a consumer
that stopped) before the broker dead-letters it: a poison message does not loop forever."""


class Dispatch(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of a dispatch message: which run of which task to execute, and from when
    (``not_before``, unix seconds: a run dispatched ahead of its due time; ``None``, as
    in messages from before it existed, means at once). Without one, the body is what
    it was before ``not_before`` existed. ``queue`` is the taskq queue it is routed to;
    the default one is left out, so such a body is what it was before queues existed."""

    task_id: str
    run_id: str
    attempt: int
    not_before: float | None = None
    queue: str = DEFAULT_QUEUE


_dispatch_decoder = msgspec.json.Decoder(Dispatch)


def decode_dispatch(body: bytes) -> Dispatch | None:
    """The dispatch in a message body, or ``None`` when the body is not one."""
    try:
        return _dispatch_decoder.decode(body)
    except msgspec.DecodeError:
        return None


class Delivery(Protocol):
    """One message handed to a consumer; settle it exactly once."""

    @property
    def dispatch(self) -> Dispatch | None:
        """The decoded body, or ``None`` when the body is not a valid dispatch."""
        ...

    @property
    def redelivered(self) -> bool: ...

    async def ack(self) -> None:
        """Done with it: remove it from the queue."""
        ...

    async def requeue(self) -> None:
        """Give it back to the queue for another consumer."""
        ...

    async def dead_letter(self) -> None:
        """It can never be processed: move it to the dead-letter queue."""
        ...


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One taskq queue as the broker sees it: messages ready in it (not yet delivered)
    and the consumers taking from it."""

    queue: str
    depth: int
    consumers: int


class Broker(Protocol):
    """Carries dispatch messages from schedulers to consumers.

    ``ping`` and ``publish`` raise ``BrokerUnavailable`` while the broker cannot be
    reached; a ``consume`` iterator waits through such an outage and goes on after it.
    """

    async def ping(self) -> str | None:
        """Raise if the broker cannot be reached; else what ``/health`` may say of it
        (such as the node it answered from), or ``None``."""
        ...

    async def queue_depth(self) -> int:
        """How many messages wait in the default queue, not yet delivered to a consumer."""
        ...

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        """Depth and consumers of each of these taskq queues, in order (a queue nothing
        was sent to or consumed from yet has neither)."""
        ...

    async def publish(self, messages: Sequence[Dispatch]) -> list[Dispatch]:
        """Publish persistently, each message to its ``queue`` (which need not have a
        consumer yet: it waits there); return the messages the broker confirmed, in order."""
        ...

    def consume(
        self, *, prefetch: int, queue: str = DEFAULT_QUEUE
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """Deliveries from the taskq queue ``queue``, at most ``prefetch`` unsettled at a time.

        Leaving the context stops consuming; unsettled deliveries go back to the queue.
        """
        ...

    def consume_dead_letters(
        self, *, prefetch: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """Deliveries from the dead-letter queue: messages a consumer rejected, or that
        went back to the queue more than ``DELIVERY_LIMIT`` times. As ``consume``, but
        there is no delivery limit here, and ``dead_letter`` drops a message."""
        ...


Role = Literal["api", "scheduler", "consumer"]
ALL_ROLES: tuple[Role, ...] = ("api", "scheduler", "consumer")

"""What users can do with tasks, on top of the ``Store`` port (the API's only dependency).

Running a task "now" goes through ``scheduled_tasks`` like any due time, so the
scheduler is the one place that publishes, under a lease: nothing is lost between
writing ``pending`` and the broker confirming the message.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio

from app.chains import ChainRefused, check_chain
from app.coalescing import Coalescer
from app.domain import (
    DEFAULT_QUEUE,
    ENTROPY,
    Chain,
    DomainError,
    Entropy,
    Run,
    RunNotFound,
    Task,
    TaskAlreadyExists,
    TaskNotFound,
    TaskStatus,
    Transition,
    UnreadableRun,
    UnreadableTask,
    cancel,
    cancel_unreadable,
    create,
    delete,
    pause,
    queue_run,
    recur,
    reschedule,
    resume,
    touch,
    unschedule,
    utcnow,
)
from app.events import event_key, task_deleted
from app.live_output import OutputEvent, follow_output
from app.logs import about
from app.notifications import NotificationRecord
from app.ports import EventBatch, RunHistory, Store, TaskChange
from app.schemas import ScheduleRequest, TaskCreate, TaskUpdate
from app.transactions import (
    MAX_COMMIT_ATTEMPTS,
    StoreContention,
    transact,
    transact_with_active_run,
)
from app.upcoming import (
    UpcomingFire,
    Window,
    resume_window,
    upcoming_page,
)

log = logging.getLogger(__name__)

QUEUE_SCAN_READS = 10
"""Batches of the task index one page of ``GET /tasks?queue=`` reads at most."""


class InvalidCursor(DomainError):
    def __init__(self) -> None:
        super().__init__("cursor is not one this server handed out")


def encode_cursor(task_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{task_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor() from None
    version, _, task_id = text.partition(":")
    if version != "v1" or not task_id:
        raise InvalidCursor()
    return task_id


def _cursor_at(after: str | None) -> str | None:
    """The cursor of the page after the id ``after`` (``None``: no page)."""
    return None if after is None else encode_cursor(after)


@dataclass(frozen=True, slots=True)
class TaskListing:
    """A page of tasks in id order; ``unreadable``: the ids on the stretch of the index
    it covers whose stored document cannot be read (left out, see ``UnreadableTask``);
    ``next_cursor``: where the next page starts (``None``: this is the last)."""

    tasks: list[Task]
    unreadable: list[str]
    next_cursor: str | None


class TaskService:
    """Create, read, change, run and schedule tasks."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = utcnow,
        entropy: Entropy = ENTROPY,
    ) -> None:
        self._store = store
        self._clock = clock
        self._entropy = entropy
        self._creates = Coalescer(store.create_each)
        self._creates_together = False

    @asynccontextmanager
    async def creating_together(self) -> AsyncGenerator[None]:
        """While open, concurrent creates of one task each (``POST /tasks``) reach the
        store together: one call a batch, as a bulk create's tasks do. The API role keeps
        it open while it serves; without it, each create is a call of its own."""
        async with anyio.create_task_group() as group:
            await group.start(self._creates.serve)
            self._creates_together = True
            try:
                yield
            finally:
                self._creates_together = False
                group.cancel_scope.cancel()

    async def create(self, spec: TaskCreate) -> Task:
        """Store a new task; it waits for ``scheduled_at`` when given."""
        [created] = await self.create_each([spec])
        if isinstance(created, TaskAlreadyExists | ChainRefused):
            raise created
        return created

    async def create_each(
        self, specs: Sequence[TaskCreate]
    ) -> list[Task | TaskAlreadyExists | ChainRefused]:
        """Store each new task on its own, all in one step of the store: each one is the
        task as stored, ``TaskAlreadyExists`` when its id was taken (by a stored task, or
        by an earlier one of ``specs``), or ``ChainRefused`` when its chain is (it names a
        task not stored yet, loops or reaches too far: ``check_chain``)."""
        now = self._clock()
        transitions = [create(self._new_task(spec, now)) for spec in specs]
        refused: dict[int, ChainRefused] = {}
        for index, transition in enumerate(transitions):
            try:
                await check_chain(self._store, transition.task_id, transition.task.chain)
            except ChainRefused as refusal:
                refused[index] = refusal
        accepted = [t for index, t in enumerate(transitions) if index not in refused]
        if named := sorted({t.task.queue for t in accepted} - {DEFAULT_QUEUE}):
            # The default queue is always in use: a create that names no other costs
            # no extra round trip.
            await self._store.note_queues(named)
        changes = [TaskChange.of(t) for t in accepted]
        if self._creates_together and len(changes) == 1:
            applied = iter([await self._creates.submit(changes[0])])
        else:
            applied = iter(await self._store.create_each(changes))
        outcomes: list[Task | TaskAlreadyExists | ChainRefused] = []
        for index, transition in enumerate(transitions):
            if index in refused:
                outcomes.append(refused[index])
            elif next(applied):
                outcomes.append(transition.task)
            else:
                outcomes.append(TaskAlreadyExists(transition.task_id))
        return outcomes

    def _new_task(self, spec: TaskCreate, now: datetime) -> Task:
        scheduled_at = None if spec.scheduled_at is None else spec.scheduled_at.astimezone(UTC)
        return Task(
            id=spec.id or self._entropy.task_id(),
            name=spec.name,
            description=spec.description,
            command=spec.command,
            args=spec.args,
            env=spec.env,
            cwd=spec.cwd,
            timeout=spec.timeout,
            max_attempts=spec.max_attempts,
            retry_backoff=spec.retry_backoff,
            success_exit_codes=spec.success_exit_codes,
            misfire=spec.misfire,
            misfire_grace=spec.misfire_grace,
            overlap=spec.overlap,
            queue=spec.queue,
            notify=spec.notify,
            chain=spec.chain,
            created_at=now,
            updated_at=now,
            scheduled_at=scheduled_at,
            next_runs=[] if scheduled_at is None else [scheduled_at],
        )

    async def get(self, task_id: str) -> Task:
        task = await self._store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def list(
        self,
        *,
        status: TaskStatus | None,
        limit: int,
        cursor: str | None,
        queue: str | None = None,
    ) -> TaskListing:
        """A page of tasks in id order, with the cursor of the next page.

        A page is ``limit`` entries of the index: tasks whose stored document cannot be
        read are left out of it (named in ``unreadable``), so it may come back short with
        a cursor to go on from. With ``queue``, only that queue's tasks: there is no index
        by queue, so a page reads at most ``QUEUE_SCAN_READS`` batches of the index and
        may come back short (even empty) with a cursor to go on from."""
        after = None if cursor is None else decode_cursor(cursor)
        if queue is None:
            page = await self._store.list_tasks(status=status, limit=limit, after=after)
            return TaskListing(list(page.tasks), list(page.unreadable), _cursor_at(page.after))
        return await self._list_queue(queue, status=status, limit=limit, after=after)

    async def _list_queue(
        self, queue: str, *, status: TaskStatus | None, limit: int, after: str | None
    ) -> TaskListing:
        tasks: list[Task] = []
        unreadable: list[str] = []
        for _ in range(QUEUE_SCAN_READS):
            batch = await self._store.list_tasks(status=status, limit=limit, after=after)
            for task in batch.tasks:
                if task.queue != queue:
                    continue
                tasks.append(task)
                ends_the_index = task is batch.tasks[-1] and batch.after is None
                if len(tasks) == limit and not ends_the_index:
                    # The next page starts after this task: it names those after it.
                    unreadable += [u for u in batch.unreadable if u < task.id]
                    return TaskListing(tasks, unreadable, encode_cursor(task.id))
            unreadable += batch.unreadable
            if batch.after is None:
                return TaskListing(tasks, unreadable, None)
            after = batch.after
        return TaskListing(tasks, unreadable, _cursor_at(after))

    async def upcoming(
        self, *, start: str | None, end: str | None, limit: int, cursor: str | None
    ) -> tuple[list[UpcomingFire], str | None]:
        """A page of the fires due from ``start`` to ``end`` (query texts; defaults: now,
        24 h later), in time order, and the next page's cursor (``None`` at the end)."""
        if cursor is None:
            window = Window.of(start, end, self._clock())
        else:
            window = resume_window(cursor, start, end)
        return await upcoming_page(self._store, window, limit=limit)

    async def update(self, task_id: str, patch: TaskUpdate) -> Task:
        changes = patch.changes()
        if "chain" in changes:
            chain = patch.chain if isinstance(patch.chain, Chain) else None
            await check_chain(self._store, task_id, chain)
        if isinstance(queue := changes.get("queue"), str) and queue != DEFAULT_QUEUE:
            # Noted before the change, so that the queue is known before a run can go to
            # it, but only once the task is known to be there: a PUT refused (404, or a
            # task that cannot be read) leaves no queue behind in /health.
            await self.get(task_id)
            await self._store.note_queues([queue])
        return await self._change(task_id, lambda task: touch(task, self._clock(), **changes))

    async def delete(self, task_id: str) -> None:
        """Delete the task and its runs; a command still running is stopped first. A task
        whose stored document cannot be read is deleted all the same, unless that
        document changes meanwhile (it is then read again)."""
        for _ in range(MAX_COMMIT_ATTEMPTS):
            try:
                deleted = await transact(
                    self._store, task_id, lambda task: delete(task, self._clock())
                )
            except UnreadableTask as unreadable:
                if await self._delete_unreadable(unreadable):
                    return
                continue
            assert deleted.before is not None
            active = deleted.before.active_run
            if active is not None:
                await self._store.announce_cancel(active.run_id)
            return
        raise StoreContention(f"task {task_id!r} kept changing; try again")

    async def _delete_unreadable(self, unreadable: UnreadableTask) -> bool:
        """Delete a task whose stored document cannot be read, if it is still the one
        read; whether it was. Which of its runs is active cannot be read, so every one of
        them is told to stop (a run that ended has nothing to stop)."""
        task_id = unreadable.task_id
        run_ids = await self._store.delete_unreadable(
            task_id, unreadable.document, events=[task_deleted(task_id, self._clock())]
        )
        if run_ids is None:
            return False
        log.warning(
            "task %r deleted, with its stored document that could not be read (%s)",
            task_id,
            unreadable.reason,
            extra=about(task_id),
        )
        for run_id in run_ids:
            await self._store.announce_cancel(run_id)
        return True

    async def cancel(self, task_id: str) -> Task:
        """Stop what is coming for the task: a queued run never starts, a running command
        is stopped wherever it runs (its consumer records the cancellation), and a
        one-shot time it waits for passes with nothing run."""

        def plan(task: Task, active: Run | None) -> Transition:
            return cancel(task, active, self._clock(), entropy=self._entropy)

        try:
            cancelled = await transact_with_active_run(self._store, task_id, plan)
        except UnreadableRun as unreadable:
            cancelled = await self._cancel_unreadable(unreadable)
        before = cancelled.before
        assert before is not None
        if before.status == TaskStatus.RUNNING and before.active_run is not None:
            await self._store.announce_cancel(before.active_run.run_id)
        return cancelled.task

    async def _cancel_unreadable(self, unreadable: UnreadableRun) -> Transition:
        """Cancel a task whose active run's document cannot be read (``cancel_unreadable``)."""
        log.warning(
            "%s: %s; cancelling its task without it",
            unreadable,
            unreadable.reason,
            extra=about(unreadable.task_id, unreadable.run_id),
        )

        def plan(task: Task) -> Transition:
            return cancel_unreadable(task, unreadable, self._clock(), entropy=self._entropy)

        return await transact(self._store, unreadable.task_id, plan)

    async def execute(self, task_id: str) -> Run:
        """Queue a run now; refused while the task has a run queued or running (but not
        for a fire dispatched ahead of its due time: that one is withdrawn). A one-shot
        time the task waits for is consumed: this is that run, brought forward."""

        def plan(task: Task, active: Run | None) -> Transition:
            return queue_run(task, self._clock(), active, entropy=self._entropy)

        return (await transact_with_active_run(self._store, task_id, plan)).run

    async def schedule(self, task_id: str, request: ScheduleRequest) -> Task:
        """Run the task once at a time (right away if it has passed) or on a recurrence.

        While a run is active the new time is remembered and becomes due when it ends;
        a fire dispatched ahead of its due time is withdrawn instead (it is not due yet).
        """

        def plan(task: Task, active: Run | None) -> Transition:
            now = self._clock()
            recurrence = request.recurrence(now)
            if recurrence is None:
                assert request.at is not None
                return reschedule(task, request.at.astimezone(UTC), now, active)
            return recur(task, recurrence, now, active)

        return await self._change_with_active_run(task_id, plan)

    async def unschedule(self, task_id: str) -> Task:
        """Drop the task's schedule; a run already queued or running goes on (but not a
        fire dispatched ahead of its due time)."""
        return await self._change_with_active_run(
            task_id, lambda task, active: unschedule(task, self._clock(), active)
        )

    async def pause(self, task_id: str) -> Task:
        """Stop the task's scheduled fires until ``resume``, including one dispatched
        ahead of its due time."""
        return await self._change_with_active_run(
            task_id, lambda task, active: pause(task, self._clock(), active)
        )

    async def resume(self, task_id: str) -> Task:
        """Fire the task on its schedule again."""
        return await self._change(task_id, lambda task: resume(task, self._clock()))

    async def _change(self, task_id: str, plan: Callable[[Task], Transition]) -> Task:
        return (await transact(self._store, task_id, plan)).task

    async def _change_with_active_run(
        self, task_id: str, plan: Callable[[Task, Run | None], Transition]
    ) -> Task:
        return (await transact_with_active_run(self._store, task_id, plan)).task

    async def runs(self, task_id: str, *, limit: int) -> RunHistory:
        """The task's ``limit`` most recent runs, newest first; those whose stored document
        cannot be read are left out (named in ``unreadable``, see ``UnreadableRun``)."""
        history = await self._store.list_runs(task_id, limit=limit)
        if not history.runs and not history.unreadable:
            await self._check_stored(task_id)
        return history

    async def notifications(self, run_ids: Sequence[str]) -> dict[str, list[NotificationRecord]]:
        """How the notifications of these runs went, by run id."""
        return await self._store.notification_records(run_ids)

    async def run(self, task_id: str, run_id: str) -> Run:
        run = await self._store.get_run(task_id, run_id)
        if run is None:
            await self._check_stored(task_id)
            raise RunNotFound(task_id, run_id)
        return run

    async def _check_stored(self, task_id: str) -> None:
        """Raise ``TaskNotFound`` unless the task is stored. One whose document cannot be
        read is: its runs are stored apart from it, and can be read."""
        with suppress(UnreadableTask):
            await self.get(task_id)

    async def output(
        self, task_id: str, run_id: str, *, follow: bool
    ) -> AsyncGenerator[OutputEvent]:
        """A run's output: what there is now, and with ``follow`` what it prints until
        it ends (see ``app.live_output``). Raises before the first event when there is
        no such task or run."""
        try:
            return await follow_output(self._store, task_id, run_id, follow=follow)
        except RunNotFound:
            await self._check_stored(task_id)
            raise

    async def events(self, after: str | None) -> AsyncGenerator[EventBatch]:
        """The lifecycle events after the event id ``after`` (``None``: from now on),
        as they happen (see ``EventLog.follow_events``). Raises before the first batch
        when ``after`` is not an event id (``InvalidEventId``), when this process
        follows as many streams as it may, or when the store is out of reach."""
        if after is not None:
            event_key(after)
        following = AsyncExitStack()
        async with following:
            batches = await following.enter_async_context(self._store.follow_events(after))
            # The batches own the following from here on, and end it when they end.
            return _owning(batches, following.pop_all())


async def _owning(
    batches: AsyncIterator[EventBatch], following: AsyncExitStack
) -> AsyncGenerator[EventBatch]:
    async with following:
        async for batch in batches:
            yield batch

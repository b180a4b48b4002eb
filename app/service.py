"""What users can do with tasks, on top of the ``Store`` port (the API's only dependency).

Running a task "now" goes through ``scheduled_tasks`` like any due time, so the
scheduler is the one place that publishes, under a lease: nothing is lost between
writing ``pending`` and the broker confirming the message.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime

from app.domain import (
    ACTIVE_STATUSES,
    DomainError,
    InvalidTransition,
    RevisionConflict,
    Run,
    RunNotFound,
    Task,
    TaskNotFound,
    TaskStatus,
    cancel_queued,
    due_after_run,
    new_task_id,
    pause,
    queue_run,
    recur,
    request_cancel,
    reschedule,
    resume,
    timestamp,
    touch,
    unschedule,
    utcnow,
)
from app.live_output import OutputEvent, follow_output
from app.ports import KEEP, UNSCHEDULE, DueAt, Store, TaskChange, due_at
from app.schemas import ScheduleRequest, TaskCreate, TaskUpdate

MAX_COMMIT_ATTEMPTS = 50


class InvalidCursor(DomainError):
    def __init__(self) -> None:
        super().__init__("cursor is not one this server handed out")


class StoreContention(Exception):
    """A task changed under us on every attempt; the caller may try again later."""


async def transact(
    store: Store,
    task_id: str,
    plan: Callable[[Task], TaskChange],
    *,
    known: Task | None = None,
) -> TaskChange:
    """Read the task, plan a change from it and commit it; re-plan when it changed meanwhile.

    ``plan`` raises a ``DomainError`` when the current state does not allow the change.
    ``known`` is a recent copy of the task to plan from first, saving a read.
    """
    for _ in range(MAX_COMMIT_ATTEMPTS):
        task, known = known or await store.get_task(task_id), None
        if task is None:
            raise TaskNotFound(task_id)
        change = plan(task)
        try:
            await store.commit(change)
        except RevisionConflict:
            continue
        return change
    raise StoreContention(f"task {task_id!r} kept changing; try again")


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


class TaskService:
    """Create, read, change, run and schedule tasks."""

    def __init__(self, store: Store, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._store = store
        self._clock = clock

    async def create(self, spec: TaskCreate) -> Task:
        """Store a new task; schedule it when ``scheduled_at`` is given."""
        now = self._clock()
        scheduled_at = None if spec.scheduled_at is None else spec.scheduled_at.astimezone(UTC)
        task = Task(
            id=spec.id or new_task_id(),
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
            created_at=now,
            updated_at=now,
            scheduled_at=scheduled_at,
            next_runs=[] if scheduled_at is None else [scheduled_at],
        )
        schedule = KEEP if scheduled_at is None else DueAt(timestamp(scheduled_at))
        await self._store.commit(TaskChange(task.id, None, task, schedule=schedule))
        return task

    async def get(self, task_id: str) -> Task:
        task = await self._store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def list(
        self, *, status: TaskStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[Task], str | None]:
        """A page of tasks in id order and the cursor of the next page (``None`` at the end)."""
        after = None if cursor is None else decode_cursor(cursor)
        tasks = await self._store.list_tasks(status=status, limit=limit + 1, after=after)
        if len(tasks) <= limit:
            return tasks, None
        page = tasks[:limit]
        return page, encode_cursor(page[-1].id)

    async def update(self, task_id: str, patch: TaskUpdate) -> Task:
        changes = patch.changes()

        def plan(task: Task) -> TaskChange:
            return TaskChange(task_id, task.revision, touch(task, self._clock(), **changes))

        return _new_task(await transact(self._store, task_id, plan))

    async def delete(self, task_id: str) -> None:
        """Delete the task and its runs; a command still running is stopped first."""
        deleted: list[Task] = []

        def plan(task: Task) -> TaskChange:
            deleted[:] = [task]
            return TaskChange(task_id, task.revision, None)

        await transact(self._store, task_id, plan)
        active = deleted[0].active_run
        if active is not None:
            await self._store.announce_cancel(active.run_id)

    async def cancel(self, task_id: str) -> Task:
        """Cancel the task's active run: a queued one never starts, a running command is
        stopped wherever it runs (its consumer records the cancellation)."""
        for _ in range(MAX_COMMIT_ATTEMPTS):
            task = await self.get(task_id)
            now = self._clock()
            if task.status == TaskStatus.RUNNING:
                change = TaskChange(task_id, task.revision, request_cancel(task, now))
            else:
                if task.status != TaskStatus.PENDING or task.active_run is None:
                    raise InvalidTransition(f"task {task_id!r} is {task.status}: nothing to cancel")
                run = await self._store.get_run(task_id, task.active_run.run_id)
                if run is None:
                    continue  # its run is being rewritten: look again
                cancelled, runs = cancel_queued(task, run, now)
                schedule = due_at(due_after_run(cancelled))
                change = TaskChange(task_id, task.revision, cancelled, runs, schedule)
            try:
                await self._store.commit(change)
            except RevisionConflict:
                continue
            if task.status == TaskStatus.RUNNING and task.active_run is not None:
                await self._store.announce_cancel(task.active_run.run_id)
            return _new_task(change)
        raise StoreContention(f"task {task_id!r} kept changing; try again")

    async def execute(self, task_id: str) -> Run:
        """Queue a run now; refused while the task is already pending or running."""

        def plan(task: Task) -> TaskChange:
            now = self._clock()
            pending, run = queue_run(task, now)
            return TaskChange(
                task_id, task.revision, pending, runs=[run], schedule=DueAt(timestamp(now))
            )

        change = await transact(self._store, task_id, plan)
        return change.runs[0]

    async def schedule(self, task_id: str, request: ScheduleRequest) -> Task:
        """Run the task once at a time (right away if it has passed) or on a recurrence.

        While a run is active the new time is remembered and becomes due when it ends.
        """

        def plan(task: Task) -> TaskChange:
            now = self._clock()
            recurrence = request.recurrence(now)
            if recurrence is None:
                assert request.at is not None
                scheduled = reschedule(task, request.at.astimezone(UTC), now)
            else:
                scheduled = recur(task, recurrence, now)
            assert scheduled.scheduled_at is not None
            if task.status in ACTIVE_STATUSES:
                return TaskChange(task_id, task.revision, scheduled)
            due = DueAt(timestamp(scheduled.scheduled_at))
            return TaskChange(task_id, task.revision, scheduled, schedule=due)

        return _new_task(await transact(self._store, task_id, plan))

    async def unschedule(self, task_id: str) -> Task:
        """Drop the task's schedule; a run already queued or running goes on."""

        def plan(task: Task) -> TaskChange:
            idle = unschedule(task, self._clock())
            if task.status in ACTIVE_STATUSES:
                # Its entry belongs to the active run (dispatch or lease): leave it.
                return TaskChange(task_id, task.revision, idle)
            return TaskChange(task_id, task.revision, idle, schedule=UNSCHEDULE)

        return _new_task(await transact(self._store, task_id, plan))

    async def pause(self, task_id: str) -> Task:
        """Stop the task's scheduled fires until ``resume``."""

        def plan(task: Task) -> TaskChange:
            paused = pause(task, self._clock())
            if task.status in ACTIVE_STATUSES:
                return TaskChange(task_id, task.revision, paused)
            return TaskChange(task_id, task.revision, paused, schedule=UNSCHEDULE)

        return _new_task(await transact(self._store, task_id, plan))

    async def resume(self, task_id: str) -> Task:
        """Fire the task on its schedule again."""

        def plan(task: Task) -> TaskChange:
            resumed = resume(task, self._clock())
            if task.status in ACTIVE_STATUSES or resumed.scheduled_at is None:
                return TaskChange(task_id, task.revision, resumed)
            due = DueAt(timestamp(resumed.scheduled_at))
            return TaskChange(task_id, task.revision, resumed, schedule=due)

        return _new_task(await transact(self._store, task_id, plan))

    async def runs(self, task_id: str, *, limit: int) -> list[Run]:
        """The task's runs, newest first."""
        runs = await self._store.list_runs(task_id, limit=limit)
        if not runs:
            await self.get(task_id)
        return runs

    async def run(self, task_id: str, run_id: str) -> Run:
        run = await self._store.get_run(task_id, run_id)
        if run is None:
            await self.get(task_id)
            raise RunNotFound(task_id, run_id)
        return run

    async def output(
        self, task_id: str, run_id: str, *, follow: bool
    ) -> AsyncGenerator[OutputEvent]:
        """A run's output: what there is now, and with ``follow`` what it prints until
        it ends (see ``app.live_output``). Raises before the first event when there is
        no such task or run."""
        try:
            return await follow_output(self._store, task_id, run_id, follow=follow)
        except RunNotFound:
            await self.get(task_id)
            raise


def _new_task(change: TaskChange) -> Task:
    assert change.task is not None
    return change.task

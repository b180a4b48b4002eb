"""Read a task, plan its transition, commit it; plan again when it changed meanwhile.

The one way every role (API service, scheduler, consumer) changes a stored task: a
transition is planned from what was read and committed only if the task is still at
the revision it was read at (``app.domain`` explains why).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from app.chains import chained_change, change_of, involves_chain
from app.domain import RevisionConflict, Run, Task, TaskNotFound, Transition
from app.metrics import count_committed
from app.ports import TaskStore

MAX_COMMIT_ATTEMPTS = 50


class StoreContention(Exception):
    """A task changed under us on every attempt; the caller may try again later."""


async def transact(
    store: TaskStore,
    task_id: str,
    plan: Callable[[Task], Transition],
    *,
    known: Task | None = None,
) -> Transition:
    """Read the task, plan a transition from it and commit it; return what was committed
    (``before`` is the document it replaced).

    ``plan`` raises a ``DomainError`` when the current state does not allow the change.
    ``known`` is a recent copy of the task to plan from first, saving a read.
    """

    async def read() -> Task:
        nonlocal known
        task, known = known or await store.get_task(task_id), None
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def attempt() -> Transition | None:
        return await _commit(store, plan(await read()))

    return await _retrying(task_id, attempt)


async def transact_with_active_run(
    store: TaskStore, task_id: str, plan: Callable[[Task, Run | None], Transition]
) -> Transition:
    """As ``transact``, planning from the task and its active run (``None`` when it has
    none), read together.

    Raises ``UnreadableRun`` when the active run's document cannot be read, changing
    nothing. Taking the run for gone would not help: a run that is gone reads as one
    that changed meanwhile, so every attempt would read it again and the change end in
    ``StoreContention`` (a "try again" that can never succeed); and planning without
    the run could drop the task's queued or running run unseen. The task itself stays
    as it is, so its run goes on (the consumer recording its end writes the run afresh),
    and deleting the task still works (``transact`` does not read runs)."""

    async def attempt() -> Transition | None:
        task = await store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        if task.active_run is None:
            return await _commit(store, plan(task, None))
        task, run = await store.get_task_and_run(task_id, task.active_run.run_id)
        if task is None:
            raise TaskNotFound(task_id)
        if task.active_run is None or run is None or run.run_id != task.active_run.run_id:
            return None  # its active run changed between the reads: look again
        return await _commit(store, plan(task, run))

    return await _retrying(task_id, attempt)


async def _commit(store: TaskStore, transition: Transition) -> Transition | None:
    """Commit ``transition`` with what it does to the tasks of its chain (``app.chains``);
    ``None`` when the task, or a task of its chain, changed since it was read."""
    targets: list[Transition] = []
    if involves_chain(transition):
        transition, targets = await chained_change(store, transition)
    try:
        await store.commit(change_of(transition, targets))
    except RevisionConflict:
        return None
    for committed in (transition, *targets):
        count_committed(committed)
    return transition


async def commit_alone(store: TaskStore, transition: Transition) -> bool:
    """Commit ``transition`` (with its chain), planned already; whether it applied."""
    return await _commit(store, transition) is not None


async def _retrying(
    task_id: str, attempt: Callable[[], Awaitable[Transition | None]]
) -> Transition:
    for _ in range(MAX_COMMIT_ATTEMPTS):
        committed = await attempt()
        if committed is not None:
            return committed
    raise StoreContention(f"task {task_id!r} kept changing; try again")

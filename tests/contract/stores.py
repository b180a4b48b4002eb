"""Helpers of the store contract suites: tasks and runs as the roles would store them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import msgspec
import redis.asyncio as redis

import tests.conftest
from app.domain import (
    Outcome,
    Run,
    Task,
    Transition,
    finish_run,
    queue_run,
    start_run,
    utcnow,
)
from app.domain import create as create_task
from app.ports import LiveOutput, OutputPage, Store, TaskChange, TaskStore

RUN_HISTORY = 5
StoreOpener = Callable[..., AbstractAsyncContextManager[Store]]


def make_task(task_id: str, **changes: object) -> Task:
    now = utcnow()
    task = Task(
        id=task_id, name=f"name of {task_id}", command="true", created_at=now, updated_at=now
    )
    return msgspec.structs.replace(task, **changes)


async def create(store: TaskStore, task_id: str, **changes: object) -> Task:
    task = make_task(task_id, **changes)
    await store.commit(TaskChange(task_id, None, task))
    return task


def next_revision(task: Task, **changes: object) -> Task:
    return msgspec.structs.replace(task, revision=task.revision + 1, **changes)


def unpack(transition: Transition) -> tuple[Task, Run]:
    """The new task and the (one) run a transition writes."""
    return transition.task, transition.run


async def running_run(store: TaskStore, task_id: str) -> tuple[Task, Run]:
    """A new task whose run a worker has started, as stored (with its events)."""
    created = create_task(make_task(task_id))
    await store.commit(TaskChange.of(created))
    queued = queue_run(created.task, utcnow())
    await store.commit(TaskChange.of(queued))
    started = start_run(queued.task, queued.run, "worker", utcnow(), lease_until=utcnow())
    await store.commit(TaskChange.of(started))
    return unpack(started)


def finishing(task: Task, run: Run) -> TaskChange:
    """The change that records ``run`` as completed."""
    outcome = Outcome(exit_code=0, duration=0.1, output="", truncated=False)
    return TaskChange.of(finish_run(task, run, outcome, utcnow()))


async def kept(store: LiveOutput, run_id: str) -> OutputPage:
    """What a follower starting now gets first: the live output kept."""
    async with store.follow(run_id) as pages:
        return await anext(pages)


async def redis_ttl(key: str) -> int:
    """The TTL of a raw Redis key: -2 when it does not exist, -1 when it never expires."""
    client = redis.Redis.from_url(tests.conftest.REDIS_URL)
    try:
        return await client.ttl(key)
    finally:
        await client.aclose()

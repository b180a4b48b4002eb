"""A task waiting for a one-shot time is ``pending``: a run is coming, and it can be
cancelled, run now, paused or unscheduled like any pending work."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.adapters.memory_broker import MemoryBroker
from app.adapters.memory_store import MemoryStore
from app.domain import InvalidTransition, TaskStatus, timestamp, utcnow
from app.scheduler import Scheduler
from app.schemas import ScheduleRequest, TaskCreate
from app.service import TaskService

IN_AN_HOUR = timedelta(hours=1)


async def waiting_task(store: MemoryStore, task_id: str = "a") -> TaskService:
    service = TaskService(store)
    await service.create(TaskCreate(id=task_id, name=task_id, command="true"))
    await service.schedule(task_id, ScheduleRequest(at=utcnow() + IN_AN_HOUR))
    return service


async def due_ids(store: MemoryStore, *, after: timedelta) -> list[str]:
    moment = timestamp(utcnow() + after)
    return [c.task_id for c in await store.claim_due(now=moment, limit=10, lease=1, token="t")]


async def test_a_task_waiting_for_its_time_is_pending_without_a_run(store: MemoryStore) -> None:
    service = await waiting_task(store)
    task = await service.get("a")
    assert task.status == TaskStatus.PENDING and task.active_run is None
    pending = await service.list(status=TaskStatus.PENDING, limit=10, cursor=None)
    assert [t.id for t in pending.tasks] == ["a"]
    assert (await store.list_runs("a", limit=10)).runs == []


async def test_a_task_created_with_a_time_is_pending_too(store: MemoryStore) -> None:
    spec = TaskCreate(id="a", name="a", command="true", scheduled_at=utcnow() + IN_AN_HOUR)
    assert (await TaskService(store).create(spec)).status == TaskStatus.PENDING


async def test_cancel_keeps_the_waiting_run_from_ever_happening(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    service = await waiting_task(store)
    cancelled = await service.cancel("a")
    assert cancelled.status == TaskStatus.CANCELLED and cancelled.scheduled_at is None
    assert await due_ids(store, after=2 * IN_AN_HOUR) == [], "its entry is gone"
    assert await Scheduler(store, broker, lease_seconds=30).dispatch_due() == 0
    assert (await store.list_runs("a", limit=10)).runs == []


async def test_execute_while_waiting_runs_it_now_and_consumes_the_time(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    service = await waiting_task(store)
    run = await service.execute("a")
    task = await service.get("a")
    assert task.status == TaskStatus.PENDING and task.active_run is not None
    assert task.active_run.run_id == run.run_id
    assert (task.scheduled_at, task.next_runs) == (None, [])
    assert await Scheduler(store, broker, lease_seconds=30).dispatch_due() == 1
    assert await due_ids(store, after=2 * IN_AN_HOUR) == [], "nothing more at the old time"


async def test_unschedule_or_pause_while_waiting_leaves_it_as_it_was(store: MemoryStore) -> None:
    service = await waiting_task(store)
    paused = await service.pause("a")
    assert paused.status == TaskStatus.CREATED and await due_ids(store, after=2 * IN_AN_HOUR) == []
    resumed = await service.resume("a")
    assert resumed.status == TaskStatus.PENDING
    assert await due_ids(store, after=2 * IN_AN_HOUR) == ["a"]
    assert (await service.unschedule("a")).status == TaskStatus.CREATED


async def test_a_recurring_task_keeps_its_status_between_fires(store: MemoryStore) -> None:
    service = TaskService(store)
    await service.create(TaskCreate(id="a", name="a", command="true"))
    recurring = await service.schedule("a", ScheduleRequest(every=60))
    assert recurring.status == TaskStatus.CREATED
    with pytest.raises(InvalidTransition, match="nothing to cancel"):
        await service.cancel("a")

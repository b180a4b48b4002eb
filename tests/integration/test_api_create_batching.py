"""Creates of one task each, sent to the real Redis together while the API serves
(``TaskService.creating_together``): each caller gets its own answer, and a batch that
fails in an outage fails each of its creates alone, losing nothing and storing nothing
twice, whether Redis never saw it or applied it and the answer was lost."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import pytest

from app.domain import Task, TaskAlreadyExists
from app.ports import Store, StoreUnavailable, TaskChange
from app.schemas import TaskCreate
from app.service import TaskService

ROUND_TRIP_DELAY = 0.05
"""Seconds each batched call waits before it reaches Redis: creates made meanwhile queue."""

Answer = Task | Exception


class Calls:
    """Wraps the store's ``create_each``: records each batch, slows it down, and can
    fail the first batch of more than one ``before`` or ``after`` Redis applies it."""

    def __init__(self, store: Store, *, lose: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.failed: list[str] = []
        self._create_each = store.create_each
        self._lose = lose

    async def create_each(self, changes: Sequence[TaskChange]) -> list[bool]:
        ids = [change.task_id for change in changes]
        self.batches.append(ids)
        await anyio.sleep(ROUND_TRIP_DELAY)
        if self._lose is None or self.failed or len(changes) < 2:
            return await self._create_each(changes)
        self.failed = ids
        if self._lose == "after":
            await self._create_each(changes)
        raise StoreUnavailable(f"injected: a batch of {len(ids)} creates lost {self._lose}")


async def create_all(service: TaskService, specs: Sequence[TaskCreate]) -> list[tuple[str, Answer]]:
    """Create every spec concurrently (the first alone, the rest while it is in
    flight); each one's task id and answer (the task or what was raised), in order."""
    answers: list[tuple[str, Answer]] = []

    async def create(spec: TaskCreate) -> None:
        assert spec.id is not None
        try:
            answers.append((spec.id, await service.create(spec)))
        except (TaskAlreadyExists, StoreUnavailable) as exc:
            answers.append((spec.id, exc))

    async with anyio.create_task_group() as group:
        for spec in specs:
            group.start_soon(create, spec)
    return answers


def spec(task_id: str, name: str = "") -> TaskCreate:
    return TaskCreate(id=task_id, name=name or task_id, command="true")


async def serving(
    store: Store, calls: Calls, body: Callable[[TaskService], Awaitable[None]]
) -> None:
    store.create_each = calls.create_each  # type: ignore[method-assign]
    service = TaskService(store)
    with anyio.fail_after(10):
        async with service.creating_together():
            await body(service)


async def test_concurrent_creates_share_round_trips_and_each_gets_its_own_answer(
    store: Store,
) -> None:
    calls = Calls(store)
    answers: list[tuple[str, Answer]] = []

    async def body(service: TaskService) -> None:
        await service.create(spec("taken", "first"))
        specs = [spec(f"t{n}") for n in range(20)]
        specs += [spec("taken", "again"), spec("twice", "one"), spec("twice", "other")]
        answers.extend(await create_all(service, specs))

    await serving(store, calls, body)

    assert len(calls.batches) <= 4, calls.batches  # the first create, then 23 in at most 3
    assert sum(len(batch) for batch in calls.batches) == 24
    by_id: dict[str, list[Answer]] = {}
    for task_id, answer in answers:
        by_id.setdefault(task_id, []).append(answer)
    for n in range(20):
        [created] = by_id[f"t{n}"]
        assert isinstance(created, Task)
        stored = await store.get_task(f"t{n}")
        assert stored is not None
        assert stored.name == f"t{n}"
    [refused] = by_id["taken"]
    assert isinstance(refused, TaskAlreadyExists)
    taken = await store.get_task("taken")
    assert taken is not None
    assert taken.name == "first", "a refused create changed nothing"
    # Two creates of one new id in one batch: the first stored, the second refused.
    twice = by_id["twice"]
    assert sorted(type(answer).__name__ for answer in twice) == ["Task", "TaskAlreadyExists"]
    [stored_one] = [answer for answer in twice if isinstance(answer, Task)]
    stored_twice = await store.get_task("twice")
    assert stored_twice is not None
    assert stored_twice.name == stored_one.name


@pytest.mark.parametrize("lose", ["before", "after"])
async def test_a_batch_failing_in_an_outage_fails_each_create_in_it_alone(
    store: Store, lose: str
) -> None:
    calls = Calls(store, lose=lose)
    first: list[tuple[str, Answer]] = []
    again: list[tuple[str, Answer]] = []

    async def body(service: TaskService) -> None:
        first.extend(await create_all(service, [spec(f"t{n}") for n in range(10)]))
        # What a client does with a 503: it asks again.
        again.extend(
            await create_all(
                service,
                [spec(task_id) for task_id, answer in first if isinstance(answer, Exception)],
            )
        )

    await serving(store, calls, body)

    failed = {task_id for task_id, answer in first if isinstance(answer, StoreUnavailable)}
    assert failed == set(calls.failed)
    assert len(failed) >= 2, "the outage hit a batch of several creates"
    assert all(isinstance(answer, Task) for task_id, answer in first if task_id not in failed)
    assert {task_id for task_id, _ in again} == failed
    for _, answer in again:
        if lose == "before":
            assert isinstance(answer, Task), "Redis never saw it: the create goes through"
        else:
            assert isinstance(answer, TaskAlreadyExists), "Redis had it: not stored twice"
    listed = await store.list_tasks(status=None, limit=100, after=None)
    assert sorted(task.id for task in listed.tasks) == sorted(f"t{n}" for n in range(10))

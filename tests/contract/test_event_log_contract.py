"""``EventLog``, one suite for every adapter: the in-memory one is the reference, Redis
must match. Events come from commits (``TaskChange.events``), as every role makes them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from app.domain import RevisionConflict, TaskAlreadyExists, create, delete, touch, utcnow
from app.events import Event, EventType, event_key
from app.ports import EventBatch, EventLog, Store, TaskChange, TooManyFollowers
from tests.contract.stores import StoreOpener, finishing, make_task, running_run


def creating(*task_ids: str) -> list[TaskChange]:
    return [TaskChange.of(create(make_task(task_id))) for task_id in task_ids]


async def everything(store: EventLog, after: str | None = None) -> list[Event]:
    """Every event kept after ``after``, read page by page."""
    events: list[Event] = []
    while True:
        batch = await store.read_events(after, limit=7)
        events += batch.events
        if len(batch.events) < 7:
            return events
        after = events[-1].id


def kinds(events: Sequence[Event]) -> list[tuple[str, str]]:
    return [(event.type, event.task_id) for event in events]


async def next_events(batches: AsyncIterator[EventBatch]) -> EventBatch:
    """The next batch that has events (empty ones only say nothing happened)."""
    with anyio.fail_after(5):
        while not (batch := await anext(batches)).events:
            pass
    return batch


async def test_the_events_of_each_commit_read_back_in_order_with_increasing_ids(
    store: Store,
) -> None:
    await store.create_each(creating("a", "b"))
    task, run = await running_run(store, "c")
    events = await everything(store)
    assert kinds(events) == [
        ("task.created", "a"),
        ("task.created", "b"),
        ("task.created", "c"),
        ("run.queued", "c"),
        ("run.started", "c"),
    ]
    assert [event_key(e.id) for e in events] == sorted({event_key(e.id) for e in events})
    started = events[-1]
    assert (started.run_id, started.attempt, started.run_status) == (run.run_id, 1, "running")
    assert started.task_status == task.status


async def test_reading_after_an_id_resumes_without_loss_or_repeat(store: Store) -> None:
    await store.create_each(creating(*(f"t{n:02}" for n in range(20))))
    every = await everything(store)
    assert len(every) == 20
    assert await everything(store, every[5].id) == every[6:]
    assert (await store.read_events(every[-1].id, limit=10)).events == []


async def test_a_refused_commit_writes_no_event(store: Store) -> None:
    [change] = creating("a")
    await store.commit(change)
    with pytest.raises(TaskAlreadyExists):
        await store.commit(TaskChange.of(create(make_task("a", name="another"))))
    assert await store.create_each(creating("a")) == [False]
    stale = touch(make_task("a", revision=7), utcnow(), name="stale")
    with pytest.raises(RevisionConflict):
        await store.commit(TaskChange.of(stale))
    assert await store.commit_each([TaskChange.of(stale)]) == [False]
    assert kinds(await everything(store)) == [("task.created", "a")]


async def test_a_commit_sent_again_after_it_was_applied_writes_its_events_once(
    store: Store,
) -> None:
    [created] = creating("a")
    await store.commit(created)
    await store.commit(created)  # as redis-py resends a script whose answer was lost
    assert created.task is not None
    renamed = TaskChange.of(touch(created.task, utcnow(), name="renamed"))
    assert await store.commit_each([renamed, renamed]) == [True, True]
    [bulk] = creating("b")
    assert await store.create_each([bulk]) == [True]
    assert await store.create_each([bulk]) == [True]
    assert kinds(await everything(store)) == [
        ("task.created", "a"),
        ("task.updated", "a"),
        ("task.created", "b"),
    ]


async def test_deleting_a_task_is_an_event(store: Store) -> None:
    [created] = creating("a")
    await store.commit(created)
    assert created.task is not None
    await store.commit(TaskChange.of(delete(created.task, utcnow())))
    deleted = (await everything(store))[-1]
    assert (deleted.type, deleted.task_id, deleted.task_status) == ("task.deleted", "a", None)


async def test_a_follower_from_now_sees_only_what_comes_next_in_order(store: Store) -> None:
    await store.create_each(creating("before"))
    async with store.follow_events(None) as batches:
        await store.create_each(creating("a", "b"))
        await store.commit(creating("c")[0])
        seen: list[Event] = []
        while len(seen) < 3:
            seen += (await next_events(batches)).events
    assert kinds(seen) == [("task.created", "a"), ("task.created", "b"), ("task.created", "c")]


async def test_a_follower_resuming_after_an_id_misses_nothing_and_repeats_nothing(
    store: Store,
) -> None:
    await store.create_each(creating(*(f"old{n:03}" for n in range(150))))
    async with store.follow_events(None) as batches:
        await store.create_each(creating("a", "b"))
        seen = list((await next_events(batches)).events)  # "a", maybe "b" too
    await store.create_each(creating("c", "d"))  # while nobody follows
    async with store.follow_events(seen[-1].id) as batches:
        await store.create_each(creating("e"))
        while seen[-1].task_id != "e":
            seen += (await next_events(batches)).events
    assert [e.task_id for e in seen] == ["a", "b", "c", "d", "e"]
    async with store.follow_events("0-0") as batches:
        replayed: list[Event] = []
        while len(replayed) < 155:
            replayed += (await next_events(batches)).events
    assert replayed == await everything(store)


async def test_followers_together_each_see_every_event_once(store: Store) -> None:
    seen: dict[int, list[str]] = {}

    async def follow(number: int, after: str | None) -> None:
        async with store.follow_events(after) as batches:
            joined.set()
            seen[number] = []
            while len(seen[number]) < 40:
                seen[number] += [e.task_id for e in (await next_events(batches)).events]

    joined = anyio.Event()
    names = [f"t{n:02}" for n in range(40)]
    async with anyio.create_task_group() as tg:
        for number in range(3):
            joined = anyio.Event()
            tg.start_soon(follow, number, None)
            await joined.wait()
        for name in names:
            await store.commit(creating(name)[0])
    assert seen == {0: names, 1: names, 2: names}


async def test_a_quiet_log_gives_followers_an_empty_batch_now_and_then(
    open_configured: StoreOpener,
) -> None:
    async with (
        open_configured(follow_keepalive=0.2) as store,
        store.follow_events(None) as batches,
    ):
        with anyio.fail_after(5):
            assert await anext(batches) == EventBatch([])


async def test_the_log_keeps_its_history_and_says_when_a_reader_missed_events(
    open_configured: StoreOpener,
) -> None:
    history = 3
    async with open_configured(event_history=history) as store:
        await store.create_each(creating("first"))
        [first] = (await store.read_events(None, limit=10)).events
        assert (await store.read_events("0-0", limit=10)).missed is None, "nothing trimmed yet"
        names = [f"t{n:03}" for n in range(300)]
        await store.create_each(creating(*names))
        kept = await everything(store)
        # Redis trims in whole nodes (``MAXLEN ~``): at least the history, not all.
        assert history <= len(kept) < 250
        assert [e.task_id for e in kept] == names[-len(kept) :]
        batch = await store.read_events(first.id, limit=10)
        assert batch.missed == kept[0].id
        assert list(batch.events) == kept[:10], "it goes on from the oldest kept"
        assert (await store.read_events(kept[0].id, limit=10)).missed is None
        async with store.follow_events(first.id) as batches:
            with anyio.fail_after(5):
                resumed = await anext(batches)
        assert (resumed.missed, resumed.events[0]) == (kept[0].id, kept[0])


async def test_followers_beyond_the_limit_are_refused(open_configured: StoreOpener) -> None:
    async with (
        open_configured(max_followers=1) as store,
        store.follow_events(None),
    ):
        with pytest.raises(TooManyFollowers):
            async with store.follow_events(None):
                pass
    async with open_configured(max_followers=1) as store, store.follow_events(None):
        pass  # the one that left made room


async def test_a_commit_that_starts_and_ends_runs_writes_their_events_in_order(
    store: Store,
) -> None:
    task, run = await running_run(store, "a")
    await store.commit(finishing(task, run))
    assert [e.type for e in await everything(store)] == [
        EventType.TASK_CREATED,
        EventType.RUN_QUEUED,
        EventType.RUN_STARTED,
        EventType.RUN_FINISHED,
    ]

"""Chains at create and update: cycle detection over the stored tasks, missing targets,
and the bound on how far a chain reaches; and a trigger through the scheduler's commits
(on the in-memory adapters)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest

from app.adapters.memory_broker import MemoryBroker
from app.adapters.memory_store import MemoryStore
from app.chains import (
    MAX_CHAIN_REACH,
    ChainRefused,
    _read_targets,  # pyright: ignore[reportPrivateUsage]
    chained_change,
    check_chain,
    find_cycle,
)
from app.domain import (
    LOST_RUN_LIMIT,
    Chain,
    ChainOutcome,
    Outcome,
    Run,
    Task,
    TaskStatus,
    TriggeredBy,
    cancel_queued,
    create,
    finish_run,
    queue_run,
    start_run,
    utcnow,
)
from app.ports import Dispatch, TaskChange
from app.scheduler import Scheduler
from app.schemas import TaskCreate
from app.service import TaskService
from app.transactions import commit_alone
from tests.unit.test_scheduler import Clock


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        pytest.param({"a": ["b"], "b": ["c"]}, None, id="a-line"),
        pytest.param({"a": ["a"]}, ["a", "a"], id="itself"),
        pytest.param({"a": ["b"], "b": ["a"]}, ["a", "b", "a"], id="two"),
        pytest.param({"a": ["b", "x"], "b": ["c"], "c": ["a"]}, ["a", "b", "c", "a"], id="three"),
        pytest.param({"a": ["b"], "b": ["c"], "c": ["b"]}, None, id="a-loop-not-through-a"),
        pytest.param({"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}, None, id="a-diamond"),
        pytest.param(
            {"a": ["b", "c"], "b": ["d"], "d": ["e"], "e": ["a"], "c": ["a"]},
            ["a", "c", "a"],
            id="the-shortest",
        ),
    ],
)
def test_find_cycle(edges: dict[str, list[str]], cycle: list[str] | None) -> None:
    assert find_cycle("a", edges) == cycle


DONE = Outcome(exit_code=0, duration=0.01, output="", truncated=False)


def task(task_id: str, **on: list[str]) -> Task:
    now = utcnow()
    chain = Chain(**on) if on else None
    return Task(
        id=task_id, name=task_id, command="true", created_at=now, updated_at=now, chain=chain
    )


async def stored(*tasks: Task) -> MemoryStore:
    store = MemoryStore(run_history=10)
    for each in tasks:
        await store.commit(TaskChange.of(create(each)))
    return store


async def test_a_chain_through_stored_tasks_without_a_loop_passes() -> None:
    store = await stored(task("c"), task("b", on_success=["c"]), task("d", on_failure=["c"]))
    await check_chain(store, "a", Chain(on_success=["b"], on_failure=["d"]))
    await check_chain(store, "a", None)


async def test_a_missing_target_is_named() -> None:
    store = await stored(task("b"))
    with pytest.raises(ChainRefused, match="do not exist: nope, gone"):
        await check_chain(store, "a", Chain(on_success=["b", "nope"], on_failure=["gone"]))


@pytest.mark.parametrize(
    ("chain", "path"),
    [
        pytest.param(Chain(on_success=["a"]), "a -> a", id="itself"),
        pytest.param(Chain(on_failure=["b"]), "a -> b -> c -> a", id="through-failure-edges"),
    ],
)
async def test_a_loop_is_named(chain: Chain, path: str) -> None:
    # Stored: b -> c on success, c -> a on failure; a itself is the one being changed.
    store = await stored(task("a"), task("b", on_success=["c"]), task("c", on_failure=["a"]))
    with pytest.raises(ChainRefused, match=f"loops: {path}$"):
        await check_chain(store, "a", chain)


async def test_a_loop_through_a_recreated_task_is_refused() -> None:
    # b's chain names x, which was deleted; x is created again, pointing back at b.
    store = await stored(task("x"), task("b", on_success=["x"]))
    x = await store.get_task("x")
    assert x is not None
    await store.commit(TaskChange("x", x.revision, None))
    with pytest.raises(ChainRefused, match="x -> b -> x"):
        await check_chain(store, "x", Chain(on_success=["b"]))


async def test_a_chain_reaching_too_many_tasks_is_refused() -> None:
    ids = [f"t{n:04}" for n in range(MAX_CHAIN_REACH + 1)]
    line = [task(ids[-1])]
    line += [task(ids[n], on_success=[ids[n + 1]]) for n in range(len(ids) - 1)]
    store = await stored(*line)
    with pytest.raises(ChainRefused, match=f"more than {MAX_CHAIN_REACH} tasks"):
        await check_chain(store, "a", Chain(on_success=[ids[0]]))
    await check_chain(store, "a", Chain(on_success=[ids[2]]))  # shorter: fine


@pytest.mark.parametrize(
    "chain",
    [
        pytest.param({"on_success": ["b", "b"]}, id="twice"),
        pytest.param({"on_failure": [f"t{n}" for n in range(33)]}, id="33-targets"),
        pytest.param({"on_success": ["bad id"]}, id="bad-id"),
        pytest.param({"then": ["b"]}, id="unknown-field"),
    ],
)
def test_a_malformed_chain_does_not_decode(chain: object) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(chain, Chain)


async def test_a_run_lost_for_good_triggers_on_failure_through_the_scheduler(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    """The scheduler records a run lost on its last attempt; the same commit queues the
    on_failure target, which it dispatches next."""
    clock = Clock()
    service = TaskService(store)
    await service.create(TaskCreate(id="d", name="d", command="true"))
    await service.create(
        TaskCreate(id="a", name="a", command="true", chain=Chain(on_failure=["d"]))
    )
    await service.execute("a")
    scheduler = Scheduler(store, broker, lease_seconds=30, clock=clock)
    last: Run | None = None
    for _ in range(LOST_RUN_LIMIT):
        await scheduler.dispatch_due()  # the queued attempt, or the lost one's next
        task = await store.get_task("a")
        assert task is not None and task.active_run is not None
        queued_run = await store.get_run("a", task.active_run.run_id)
        assert queued_run is not None
        started = start_run(task, queued_run, "host:1", clock(), lease_until=clock())
        await store.commit(TaskChange.of(started))  # its worker never renews the lease
        last = started.run
    assert last is not None
    clock.now += 1
    await scheduler.dispatch_due()  # records the last attempt lost: a fails for good
    d = await store.get_task("d")
    assert d is not None and d.status == TaskStatus.PENDING and d.active_run is not None
    d_run = await store.get_run("d", d.active_run.run_id)
    assert d_run is not None and d_run.triggered_by == TriggeredBy(task_id="a", run_id=last.run_id)
    ended = await store.get_run("a", last.run_id)
    assert ended is not None and [t.outcome for t in ended.triggered] == [ChainOutcome.QUEUED]
    await scheduler.dispatch_due()
    assert Dispatch(task_id="d", run_id=d_run.run_id, attempt=1) in [
        msgspec.json.decode(body, type=Dispatch) for body in broker.queue
    ]


async def test_a_loop_closed_behind_the_checks_stops_after_the_longest_chain_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two updates at once can close a loop neither check saw (here: written straight to
    the store). Each run then counts the chain's steps; past ``MAX_CHAIN_REACH`` of them
    the chain stops, recorded on the run that would have gone on."""
    limit = 5
    monkeypatch.setattr("app.chains.MAX_CHAIN_REACH", limit)
    store = await stored(task("a", on_success=["b"]), task("b", on_success=["a"]))
    service = TaskService(store)
    await service.execute("a")
    clock = utcnow()
    steps: list[tuple[str, int]] = []
    running = "a"
    ended: Run | None = None
    for _ in range(limit + 3):  # more than the chain may take: it must stop by itself
        current = await store.get_task(running)
        assert current is not None and current.active_run is not None
        queued = await store.get_run(running, current.active_run.run_id)
        assert queued is not None
        started = start_run(current, queued, "host:1", clock, lease_until=clock)
        await store.commit(TaskChange.of(started))
        finished = finish_run(started.task, started.run, DONE, clock)
        assert await commit_alone(store, finished)
        ended = await store.get_run(running, started.run.run_id)
        assert ended is not None
        steps.append((running, 0 if ended.triggered_by is None else ended.triggered_by.hops))
        [outcome] = ended.triggered
        if outcome.outcome == ChainOutcome.STOPPED:
            break
        assert outcome.outcome == ChainOutcome.QUEUED
        running = outcome.task_id
    else:
        pytest.fail("the chain never stopped")
    # a (started by hand), then b, a, b, a, b triggered: 5 steps, the last one stopped.
    assert steps == [("a", 0), ("b", 1), ("a", 2), ("b", 3), ("a", 4), ("b", 5)]
    assert ended is not None and [t.outcome for t in ended.triggered] == [ChainOutcome.STOPPED]
    a = await store.get_task("a")
    assert a is not None and a.active_run is None and a.status == TaskStatus.COMPLETED


class _StaleFirstRead(MemoryStore):
    """A store whose next batch read of tasks answers ``stale``, what was stored before
    the last change: the target's active run changes between the chain's two reads."""

    stale: list[Task | None] | None = None

    async def get_tasks(self, task_ids: Sequence[str]) -> list[Task | None]:
        if (stale := self.stale) is not None:
            self.stale = None
            return stale
        return await super().get_tasks(task_ids)


async def test_a_target_whose_active_run_changed_between_the_reads_is_read_again() -> None:
    store = _StaleFirstRead(run_history=10)
    for each in (task("b"), task("a", on_success=["b"])):
        await store.commit(TaskChange.of(create(each)))
    now = utcnow()
    # b has run r1 queued, which is cancelled and replaced by r2 after the first read.
    b = await store.get_task("b")
    assert b is not None
    first = queue_run(b, now)
    await store.commit(TaskChange.of(first))
    store.stale = [first.task]
    second = cancel_queued(first.task, first.run, now)
    await store.commit(TaskChange.of(second))
    again = queue_run(second.task, now)
    await store.commit(TaskChange.of(again))
    # The chain reads b (stale: r1 active), then b with r1 (now r2 is active): b again.
    assert await _read_targets(store, ["b"]) == [(again.task, again.run)]
    store.stale = [first.task]
    a = await store.get_task("a")
    assert a is not None
    queued_a = queue_run(a, now)
    started = start_run(queued_a.task, queued_a.run, "w", now, lease_until=now)
    _, [planned] = await chained_change(store, finish_run(started.task, started.run, DONE, now))
    # Planned from b as it is (r2 queued: overlap queue defers), not from the stale copy.
    assert planned.before == again.task
    assert planned.task.chain_waiting is not None

"""Chains at create and update: cycle detection over the stored tasks, missing targets,
and the bound on how far a chain reaches (on the in-memory store)."""

from __future__ import annotations

import msgspec
import pytest

from app.adapters.memory_store import MemoryStore
from app.chains import MAX_CHAIN_REACH, ChainRefused, check_chain, find_cycle
from app.domain import Chain, Task, create, utcnow
from app.ports import TaskChange


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

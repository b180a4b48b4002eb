"""A task's ``chain`` through the API: stored, shown, replaced and cleared; a target that
does not exist, a loop or a malformed chain is refused (422 / 400) and changes nothing;
runs show what triggered them and what they triggered.

Runs on every store case (``served`` in conftest.py), which also refuses any 5xx answer.
"""

from __future__ import annotations

import pytest

from app.domain import Outcome, finish_run, start_run, utcnow
from app.ports import TaskChange
from app.transactions import transact
from tests.api.conftest import Served
from tests.api.test_api import Client, assert_problem, create_task, execute, state_unchanged


async def test_a_chain_is_stored_shown_replaced_and_cleared(client: Client) -> None:
    await create_task(client, id="b")
    await create_task(client, id="d")
    chain = {"on_success": ["b"], "on_failure": ["d"]}
    created = await create_task(client, id="a", chain=chain)
    assert created["chain"] == chain
    assert (await client.get("/tasks/a")).json()["chain"] == chain
    replaced = await client.put("/tasks/a", json={"chain": {"on_failure": ["b", "d"]}})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["chain"] == {"on_failure": ["b", "d"]}
    assert (await client.put("/tasks/a", json={"name": "x"})).json()["chain"] == {
        "on_failure": ["b", "d"]
    }
    assert (await client.put("/tasks/a", json={"chain": None})).json()["chain"] is None


async def test_a_missing_target_is_a_422_naming_it(client: Client) -> None:
    await create_task(client, id="b")
    async with state_unchanged(client):
        chain = {"on_success": ["b", "nope"]}
        created = await client.post(
            "/tasks", json={"id": "a", "name": "n", "command": "true", "chain": chain}
        )
        assert_problem(created, 422, "do not exist: nope")
        updated = await client.put("/tasks/b", json={"chain": {"on_failure": ["gone"]}})
        assert_problem(updated, 422, "gone")


async def test_a_loop_is_a_422_naming_the_cycle(client: Client) -> None:
    await create_task(client, id="c")
    await create_task(client, id="b", chain={"on_success": ["c"]})
    await create_task(client, id="a", chain={"on_failure": ["b"]})
    async with state_unchanged(client):
        looped = await client.put("/tasks/c", json={"chain": {"on_success": ["a"]}})
        assert_problem(looped, 422, "c -> a -> b -> c")
        itself = await client.put("/tasks/a", json={"chain": {"on_success": ["a"]}})
        assert_problem(itself, 422, "a -> a")
        new = await client.post(
            "/tasks",
            json={"id": "n", "name": "n", "command": "true", "chain": {"on_success": ["n"]}},
        )
        assert_problem(new, 422, "n -> n")


@pytest.mark.parametrize(
    ("chain", "mentioned"),
    [
        pytest.param({"on_success": ["b", "b"]}, "more than once", id="twice"),
        pytest.param({"on_success": [f"t{n}" for n in range(33)]}, "on_success", id="33"),
        pytest.param({"on_failure": ["no spaces"]}, "on_failure", id="bad-id"),
        pytest.param({"on_done": ["b"]}, "on_done", id="unknown"),
    ],
)
async def test_a_malformed_chain_is_a_400(client: Client, chain: object, mentioned: str) -> None:
    await create_task(client, id="b")
    async with state_unchanged(client):
        created = await client.post(
            "/tasks", json={"id": "a", "name": "n", "command": "true", "chain": chain}
        )
        assert_problem(created, 400, mentioned)
        assert_problem(await client.put("/tasks/b", json={"chain": chain}), 400, mentioned)


async def test_runs_show_what_triggered_them_and_what_they_triggered(
    served: Served, client: Client
) -> None:
    await create_task(client, id="b")
    await create_task(client, id="a")
    await client.put("/tasks/a", json={"chain": {"on_success": ["b"]}})
    run = await execute(client, "a")
    store = served.store
    task = await store.get_task("a")
    queued = await store.get_run("a", run["run_id"])
    assert task is not None and queued is not None
    begun = start_run(task, queued, "test-worker", utcnow(), lease_until=utcnow())
    await store.commit(TaskChange.of(begun))
    outcome = Outcome(exit_code=0, duration=0.01, output="", truncated=False)
    await transact(store, "a", lambda current: finish_run(current, begun.run, outcome, utcnow()))

    [b_run] = (await client.get("/tasks/b/runs")).json()
    assert b_run["triggered_by"] == {"task_id": "a", "run_id": run["run_id"], "hops": 1}
    assert b_run["status"] == "queued"
    a_run = (await client.get(f"/tasks/a/runs/{run['run_id']}")).json()
    assert a_run["triggered"] == [{"task_id": "b", "outcome": "queued", "run_id": b_run["run_id"]}]
    assert a_run["triggered_by"] is None


async def test_a_bulk_create_refuses_only_the_tasks_whose_chain_is_refused(
    client: Client,
) -> None:
    await create_task(client, id="b")
    tasks = [
        {"id": "a", "name": "a", "command": "true", "chain": {"on_success": ["b"]}},
        {"id": "x", "name": "x", "command": "true", "chain": {"on_failure": ["a"]}},
        {"id": "y", "name": "y", "command": "true", "chain": {"on_success": ["y"]}},
    ]
    response = await client.post("/bulk/tasks", json={"tasks": tasks})
    assert response.status_code == 200, response.text
    answers = response.json()
    assert [answer["status"] for answer in answers] == [201, 422, 422]
    assert "do not exist: a" in answers[1]["detail"]  # not stored before this request
    assert "y -> y" in answers[2]["detail"]
    assert (await client.get("/tasks/x")).status_code == 404
    assert (await client.get("/tasks/a")).json()["chain"] == {"on_success": ["b"]}

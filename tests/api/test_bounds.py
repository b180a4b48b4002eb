"""Bounded answers: a task document has a size limit, run lists leave output out unless
asked, and list pages stop early at a byte budget with a cursor that still reaches every
item once. Runs on every store case (``served`` in conftest.py).
"""

from __future__ import annotations

import msgspec
import pytest

from app.api import PAGE_BUDGET_BYTES
from app.domain import MAX_COMMAND_BYTES, Outcome, finish_run, start_run, utcnow
from app.ports import TaskChange
from app.schemas import MAX_ENV_BYTES
from tests.api.conftest import Served
from tests.api.test_api import (
    Client,
    Json,
    assert_problem,
    create_task,
    execute,
    state_unchanged,
    task_spec,
)

KIB = 1024
OUTPUT_BYTES = 600 * KIB


def env_of(total_bytes: int) -> dict[str, str]:
    """An environment whose names and values take ``total_bytes`` bytes in all."""
    value_bytes = 8 * KIB
    env: dict[str, str] = {}
    while total_bytes > 0:
        name = f"V{len(env):03d}"
        env[name] = "x" * max(0, min(value_bytes, total_bytes - len(name)))
        total_bytes -= len(name) + len(env[name])
    return env


async def run_printing(served: Served, task_id: str, output: str) -> str:
    """Execute the task and record its run as a worker would, with ``output``."""
    run_id = (await execute(served.client, task_id))["run_id"]
    store = served.store
    task = await store.get_task(task_id)
    run = await store.get_run(task_id, run_id)
    assert task is not None and run is not None
    started = start_run(task, run, "test-worker", utcnow(), lease_until=utcnow())
    await store.commit(TaskChange.of(started))
    outcome = Outcome(exit_code=0, duration=0.01, output=output, truncated=False)
    await store.commit(TaskChange.of(finish_run(started.task, started.run, outcome, utcnow())))
    return run_id


# the task document


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"env": env_of(MAX_ENV_BYTES + 1)}, id="env-over-32-kib"),
        pytest.param({"env": env_of(1024 * KIB - 4 * KIB)}, id="env-of-1-mib"),
    ],
)
async def test_create_refuses_a_task_over_its_size_limit_with_400(
    client: Client, fields: Json
) -> None:
    async with state_unchanged(client):
        response = await client.post("/tasks", json=task_spec(**fields))

    assert_problem(response, 400, "`env`", str(MAX_ENV_BYTES))


async def test_update_refuses_an_env_over_the_size_limit_with_400(client: Client) -> None:
    await create_task(client)

    async with state_unchanged(client):
        response = await client.put("/tasks/t1", json={"env": env_of(MAX_ENV_BYTES + 1)})

    assert_problem(response, 400, "`env`")


async def test_the_largest_task_is_accepted_and_stays_under_64_kib_of_those_fields(
    client: Client,
) -> None:
    largest = task_spec(
        command="x" * MAX_COMMAND_BYTES, description="é" * 4096, env=env_of(MAX_ENV_BYTES)
    )

    task = await create_task(client, **largest)

    sized = task["command"].encode() + task["description"].encode()
    sized += "".join(name + value for name, value in task["env"].items()).encode()
    assert len(sized) <= 64 * KIB


# GET /tasks: a byte budget per page


async def test_list_pages_of_large_tasks_stop_at_the_budget_and_reach_every_task(
    client: Client,
) -> None:
    ids = [f"big-{n:02d}" for n in range(40)]
    for task_id in ids:
        await create_task(client, id=task_id, env=env_of(MAX_ENV_BYTES), description="d" * 4096)

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 1000}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get("/tasks", params=params)
        assert response.status_code == 200, response.text
        largest_task = max(len(task_json) for task_json in _items(response.content))
        assert len(response.content) <= PAGE_BUDGET_BYTES + largest_task
        seen += [task["id"] for task in response.json()]
        pages += 1
        cursor = response.headers.get("X-Next-Cursor")
        if cursor is None:
            break

    assert seen == ids
    assert pages > 1


def _items(page: bytes) -> list[bytes]:
    return [msgspec.json.encode(item) for item in msgspec.json.decode(page)]


# GET /tasks/{id}/runs: output only when asked, within the budget


async def test_runs_list_leaves_output_out_unless_asked(served: Served) -> None:
    client = served.client
    await create_task(client)
    run_id = await run_printing(served, "t1", "hello\n")

    listed = (await client.get("/tasks/t1/runs")).json()
    with_output = (await client.get("/tasks/t1/runs", params={"output": "true"})).json()
    one = (await client.get(f"/tasks/t1/runs/{run_id}")).json()

    assert [run["run_id"] for run in listed] == [run_id]
    assert "output" not in listed[0]
    assert with_output[0]["output"] == "hello\n"
    assert one["output"] == "hello\n"
    assert listed[0] == {key: value for key, value in one.items() if key != "output"}


async def test_runs_with_large_outputs_answer_within_the_budget(served: Served) -> None:
    client = served.client
    await create_task(client)
    run_ids = [await run_printing(served, "t1", "o" * OUTPUT_BYTES) for _ in range(3)]

    plain = await client.get("/tasks/t1/runs", params={"limit": 100})
    with_output = await client.get("/tasks/t1/runs", params={"limit": 100, "output": "true"})

    assert [run["run_id"] for run in plain.json()] == run_ids[::-1]
    assert len(plain.content) < 4 * KIB
    newest_first = [run["run_id"] for run in with_output.json()]
    assert 1 <= len(newest_first) < 3
    assert newest_first == run_ids[::-1][: len(newest_first)]
    assert len(with_output.content) <= PAGE_BUDGET_BYTES + OUTPUT_BYTES + 4 * KIB

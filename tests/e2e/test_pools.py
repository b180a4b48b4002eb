"""Worker pools against real ``taskq serve`` processes, Redis and RabbitMQ: a task runs
only on a consumer serving its queue, waits visibly while none does, and runs once one
starts.

Which consumer ran a run is its ``worker`` (``host:pid`` of the consumer process: each
``taskq serve`` here runs its consumer in-process, ``TASKQ_PROCESSES=1``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import ServiceProcess, cli, running, service_env, wait_for_task

pytestmark = pytest.mark.e2e

WAIT = 30.0
QUIET = 1.5
"""How long a task must stay unrun while no consumer serves its queue."""


def worker_of(service: ServiceProcess) -> str:
    return f"{os.uname().nodename}:{service.process.pid}"


async def health_queues(http: httpx.AsyncClient) -> Mapping[str, Any]:
    response = await http.get("/health")
    assert response.status_code == 200, response.text
    return response.json().get("queues", {})


async def runs_of(http: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"/tasks/{task_id}/runs")
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_task_waits_for_a_consumer_of_its_queue_then_runs_there(
    prefix: str, servers: redis.Redis
) -> None:
    env = service_env(prefix)
    async with (
        running(["serve", "--roles", "api,scheduler"], env, name="api") as api,
        running(["serve", "--roles", "consumer", "--queues", "b"], env, name="consumer-b"),
    ):
        assert api.api_url is not None
        out = await cli(
            api.api_url,
            "create",
            "--id",
            "on-a",
            "--name",
            "a",
            "--command",
            "true",
            "--queue",
            "a",
        )
        assert "queue:        a" in out
        await cli(api.api_url, "execute", "--id", "on-a")
        async with httpx.AsyncClient(base_url=api.api_url) as http:

            async def waiting_on_a() -> bool:
                queues = await health_queues(http)
                return queues.get("a") == {"depth": 1, "consumers": 0} and queues.get("b") == {
                    "depth": 0,
                    "consumers": 1,
                }

            await eventually(waiting_on_a, within=WAIT, every=0.1)
            await anyio.sleep(QUIET)  # the consumer of b leaves it alone
            task = (await http.get("/tasks/on-a")).json()
            assert (task["status"], task["queue"]) == ("pending", "a")
            [run] = await runs_of(http, "on-a")
            assert (run["status"], run["queue"]) == ("queued", "a")
            listed = (await http.get("/tasks", params={"queue": "a"})).json()
            assert [t["id"] for t in listed] == ["on-a"]
            assert "on-a" in await cli(api.api_url, "list", "--queue", "a")

            async with running(
                ["serve", "--roles", "consumer", "--queues", "a"], env, name="consumer-a"
            ) as consumer_a:
                await wait_for_task(http, "on-a", {"completed"}, within=WAIT)
                [run] = await runs_of(http, "on-a")
                assert run["worker"] == worker_of(consumer_a)
                assert (await health_queues(http))["a"] == {"depth": 0, "consumers": 1}


QUEUES = ("q1", "q2", "q3")
TASKS = 300


async def test_300_tasks_over_3_queues_each_run_on_a_consumer_of_its_queue(
    prefix: str, servers: redis.Redis
) -> None:
    env = service_env(prefix)
    consumers = {
        "c1": ["--queues", "q1"],
        "c2": ["--queues", "q2=2"],
        "c23": ["--queues", "q2,q3=3"],  # two queues, one with its own concurrency
    }
    serving = {"q1": {"c1"}, "q2": {"c2", "c23"}, "q3": {"c23"}}
    async with (
        running(["serve", "--roles", "api,scheduler"], env, name="api") as api,
        running(["serve", "--roles", "consumer", *consumers["c1"]], env, name="c1") as c1,
        running(["serve", "--roles", "consumer", *consumers["c2"]], env, name="c2") as c2,
        running(["serve", "--roles", "consumer", *consumers["c23"]], env, name="c23") as c23,
        httpx.AsyncClient(base_url=api.api_url or "", timeout=30) as http,
    ):
        name_of = {worker_of(c1): "c1", worker_of(c2): "c2", worker_of(c23): "c23"}
        tasks = [
            {
                "id": f"t{number:03d}",
                "name": "pooled",
                "command": "true",
                "queue": QUEUES[number % 3],
                "scheduled_at": "2020-01-01T00:00:00Z",
            }
            for number in range(TASKS)
        ]
        answers = (await http.post("/bulk/tasks", json={"tasks": tasks})).json()
        assert [a["status"] for a in answers] == [201] * TASKS

        async def all_completed() -> bool:
            page = (await http.get("/tasks", params={"status": "completed", "limit": 1000})).json()
            return len(page) == TASKS

        await eventually(all_completed, within=WAIT, every=0.2)

        ran_on: dict[str, set[str]] = {queue: set() for queue in QUEUES}
        limiter = anyio.CapacityLimiter(16)

        async def check(task: dict[str, Any]) -> None:
            async with limiter:
                [run] = await runs_of(http, task["id"])
            consumer = name_of[run["worker"]]
            assert consumer in serving[task["queue"]], (task["id"], task["queue"], consumer)
            assert run["queue"] == task["queue"]
            ran_on[task["queue"]].add(consumer)

        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(check, task)
        assert ran_on["q1"] == {"c1"} and ran_on["q3"] == {"c23"}
        assert ran_on["q2"] <= {"c2", "c23"}
        queues = await health_queues(http)
        assert {q: queues[q] for q in QUEUES} == {
            "q1": {"depth": 0, "consumers": 1},
            "q2": {"depth": 0, "consumers": 2},
            "q3": {"depth": 0, "consumers": 1},
        }

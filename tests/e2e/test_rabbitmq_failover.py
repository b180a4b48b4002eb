"""A RabbitMQ cluster of three nodes of the test's own, ``AMQP_URL`` listing them all:
losing the node a process is connected to costs a reconnect, not an outage.

The tasks queue is a quorum queue, replicated to the three nodes, so the two left keep it.
Redis is the shared one (under the test's prefix).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import eventually
from tests.e2e.harness import running, service_env
from tests.e2e.servers import RabbitNode, throwaway_rabbitmq_cluster

pytestmark = pytest.mark.e2e

TASKS = 300
COMMAND_SECONDS = 0.1


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncGenerator[list[RabbitNode]]:
    """One cluster for the module (forming it takes most of the module's time); each
    test leaves every node running."""
    async with throwaway_rabbitmq_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


async def broker_health(http: httpx.AsyncClient) -> dict[str, Any]:
    return (await http.get("/health")).json()["checks"]["broker"]


def node_of(cluster: list[RabbitNode], detail: str | None) -> RabbitNode | None:
    """The node a ``/health`` broker detail ("connected to amqp://...") names."""
    return next((n for n in cluster if f"127.0.0.1:{n.port}/" in (detail or "")), None)


async def all_tasks(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/tasks", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()


async def test_losing_the_node_a_consumer_uses_costs_a_reconnect_not_a_task(
    cluster: list[RabbitNode], prefix: str, tmp_path: Path
) -> None:
    nodes = ",".join(node.url for node in cluster)
    env = service_env(prefix, AMQP_URL=nodes, TASKQ_CONCURRENCY="8")
    executions = tmp_path / "executions"
    executions.mkdir()
    lost = cluster[0]  # the first node listed, which answers
    stopped = False
    try:
        async with (
            running(["serve"], env, name="taskq") as service,
            httpx.AsyncClient(base_url=service.api_url or "", timeout=30) as http,
        ):
            health = await broker_health(http)
            assert health["status"] == "up" and node_of(cluster, health["detail"]) is lost, health

            # Each execution of a task leaves a line in a file of its own.
            tasks = [
                {
                    "id": f"t{number:03d}",
                    "name": "failover",
                    "command": f"sleep {COMMAND_SECONDS}; echo ran >> {executions}/t{number:03d}",
                    "scheduled_at": "2020-01-01T00:00:00Z",
                }
                for number in range(TASKS)
            ]
            created = (await http.post("/bulk/tasks", json={"tasks": tasks})).json()
            acknowledged = {t["task"]["id"] for t in created if t["status"] == 201}
            assert len(acknowledged) == TASKS, created

            async def completed() -> int:
                return sum(t["status"] == "completed" for t in await all_tasks(http))

            async def under_way() -> bool:
                return await completed() >= TASKS // 5

            await eventually(under_way, within=60, every=0.1)
            done_before = await completed()
            began = anyio.current_time()
            stopped = True
            await lost.stop_app()
            stopped_in = anyio.current_time() - began

            async def reconnected() -> bool:
                health = await broker_health(http)
                now = node_of(cluster, health["detail"])
                return health["status"] == "up" and now is not None and now is not lost

            await eventually(reconnected, within=60, every=0.05)
            recovered_in = anyio.current_time() - began

            async def all_done() -> bool:
                return await completed() == TASKS

            await eventually(all_done, within=90, every=0.2)
            finished_in = anyio.current_time() - began

            statuses = {t["id"]: t["status"] for t in await all_tasks(http)}
            runs: dict[str, int] = {}
            limiter = anyio.CapacityLimiter(8)

            async def count_runs(task_id: str) -> None:
                async with limiter:
                    response = await http.get(f"/tasks/{task_id}/runs")
                runs[task_id] = len(response.json())

            async with anyio.create_task_group() as group:
                for task_id in acknowledged:
                    group.start_soon(count_runs, task_id)
    finally:
        if stopped:
            with anyio.CancelScope(shield=True):
                await lost.start_app()

    ran = {
        task_id: len(path.read_text().splitlines())
        for task_id in acknowledged
        if (path := executions / task_id).exists()
    }
    never = sorted(acknowledged - ran.keys())
    twice = sorted(task_id for task_id, count in ran.items() if count > 1)
    print(
        f"{TASKS} tasks, {done_before} done when node {lost.name} was stopped"
        f" (stop_app took {stopped_in:.1f} s): without a connection for"
        f" {disconnected(service.log):.2f} s, /health named another node"
        f" {recovered_in:.2f} s after the stop began, every task completed"
        f" {finished_in:.1f} s after it; lost {len(never)}, run twice {len(twice)}"
    )
    assert never == [], "every acknowledged task ran"
    assert twice == [], "no task ran twice"
    assert set(statuses.values()) == {"completed"}
    assert set(runs.values()) == {1}, {t: n for t, n in runs.items() if n != 1}


def disconnected(log: list[str]) -> float:
    """Seconds from the log's "lost the connection" to its "connected to" after it."""
    lost = reconnected = None
    for line in log:
        if lost is None and ": lost the connection to " in line:
            lost = logged_at(line)
        elif lost is not None and ": connected to " in line:
            reconnected = logged_at(line)
            break
    assert lost is not None and reconnected is not None, "\n".join(log)
    return (reconnected - lost).total_seconds()


def logged_at(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


async def test_a_process_starts_on_the_next_node_when_the_first_is_down(
    cluster: list[RabbitNode], prefix: str
) -> None:
    down, up, *_ = cluster
    env = service_env(prefix, AMQP_URL=",".join(node.url for node in cluster))
    await down.stop_app()
    try:
        began = anyio.current_time()
        async with (
            running(["serve"], env, name="taskq") as service,
            httpx.AsyncClient(base_url=service.api_url or "") as http,
        ):
            ready_in = anyio.current_time() - began
            health = await broker_health(http)
            assert health["status"] == "up"
            assert node_of(cluster, health["detail"]) is up, health
            print(f"ready on the second node in {ready_in:.1f} s with the first one down")

            task = {"id": "hello", "name": "hello", "command": "true"}
            assert (await http.post("/tasks", json=task)).status_code == 201
            assert (await http.post("/tasks/hello/execute")).status_code == 202

            async def ran() -> bool:
                return (await http.get("/tasks/hello")).json()["status"] == "completed"

            await eventually(ran, within=30, every=0.05)
    finally:
        with anyio.CancelScope(shield=True):
            await down.start_app()

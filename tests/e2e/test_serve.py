"""``taskq serve`` against the real Redis and RabbitMQ, as one process and split by role."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis

from app.adapters.amqp_nodes import node_name
from tests.conftest import AMQP_URL, eventually
from tests.e2e.harness import cli, running, service_env, wait_for_task

pytestmark = pytest.mark.e2e


async def test_one_process_runs_tasks_through_redis_and_rabbitmq(
    prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        async with httpx.AsyncClient(base_url=url) as http:
            health = await http.get("/health")
            assert health.status_code == 200
            assert health.json()["checks"] == {
                # Which RabbitMQ node it is connected to (AMQP_URL may list several).
                "broker": {"status": "up", "detail": f"connected to {node_name(AMQP_URL)}"},
                "store": {"status": "up", "detail": None},
            }

            await cli(url, "create", "--id", "hello", "--name", "Hello", "--command", "echo hello")
            queued = json.loads(await cli(url, "execute", "--id", "hello", "--json"))
            task = await wait_for_task(http, "hello", {"completed", "failed"})
            assert task["status"] == "completed"
            assert task["last_run"]["run_id"] == queued["run_id"]
            assert (await cli(url, "logs", "--id", "hello")).strip() == "hello"

            # What is in Redis is what the API says, under the seed's key names.
            stored = json.loads(await servers.get(f"{prefix}task:hello") or "{}")
            assert stored["status"] == "completed"
            assert await servers.zscore(f"{prefix}tasks", "hello") == 0
            assert await servers.zscore(f"{prefix}scheduled_tasks", "hello") is None
            assert await servers.hlen(f"{prefix}runs:hello") == 1

            # A scheduled task starts at its time, not before, and soon after. Due later
            # than the look-ahead (1 s), its entry is still its due time when read below.
            at = datetime.now(UTC) + timedelta(seconds=2.5)
            created = await http.post(
                "/tasks",
                json={
                    "id": "timed",
                    "name": "timed",
                    "command": "true",
                    "scheduled_at": at.isoformat(),
                },
            )
            assert created.status_code == 201
            assert await servers.zscore(f"{prefix}scheduled_tasks", "timed") == pytest.approx(
                at.timestamp(), abs=0.001
            )
            task = await wait_for_task(http, "timed", {"completed", "failed"})
            run = (await http.get(f"/tasks/timed/runs/{task['last_run']['run_id']}")).json()
            started = datetime.fromisoformat(run["started_at"])
            assert at <= started < at + timedelta(milliseconds=500)

        assert await service.stop(signal.SIGTERM, deadline=10) == 0


async def test_role_split_runs_200_scheduled_tasks_exactly_once(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    ran = tmp_path / "ran.log"
    env = service_env(prefix, TASKQ_CONCURRENCY="8")
    async with (
        running(["serve", "--roles", "api"], env, name="api") as api,
        running(["serve", "--roles", "scheduler"], env, name="scheduler-1"),
        running(["serve", "--roles", "scheduler"], env, name="scheduler-2"),
        running(["serve", "--roles", "consumer"], env, name="consumer-1") as consumer_1,
        running(["serve", "--roles", "consumer"], env, name="consumer-2") as consumer_2,
    ):
        assert api.api_url is not None
        ids = [f"split-{n:03}" for n in range(200)]
        at = datetime.now(UTC) + timedelta(seconds=3)
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            for task_id in ids:
                response = await http.post(
                    "/tasks",
                    json={
                        "id": task_id,
                        "name": task_id,
                        # One line per execution: counts what really ran, not what was recorded.
                        "command": f"echo {task_id} >> {ran}",
                        "scheduled_at": at.isoformat(),
                    },
                )
                assert response.status_code == 201, response.text

            async def all_completed() -> bool:
                done = await http.get("/tasks", params={"status": "completed", "limit": 1000})
                return len(done.json()) == len(ids)

            await eventually(all_completed, within=60, every=0.1)
            runs = {task_id: (await http.get(f"/tasks/{task_id}/runs")).json() for task_id in ids}

    executions = ran.read_text().split()
    workers = {run["worker"] for task_runs in runs.values() for run in task_runs}
    print(
        f"200 tasks due at once: {len(executions)} executions, "
        f"{len(set(executions))} distinct, workers {sorted(workers)}"
    )
    assert sorted(executions) == ids, "every task ran exactly once"
    assert all(len(task_runs) == 1 for task_runs in runs.values())
    assert all(task_runs[0]["started_at"] >= at.isoformat()[:19] for task_runs in runs.values())
    consumer_pids = {str(consumer_1.process.pid), str(consumer_2.process.pid)}
    assert {worker.rsplit(":", 1)[1] for worker in workers} <= consumer_pids

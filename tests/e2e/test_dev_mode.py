"""``taskq dev``: the whole service in one process with nothing else installed."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import cli, running, service_env, wait_for_task

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("backend", ["uvloop", "asyncio", "trio"])
async def test_dev_mode_runs_a_task_created_and_executed_through_the_cli(
    backend: str, prefix: str
) -> None:
    # No Redis or RabbitMQ settings at all: dev mode must not need them.
    env = service_env(prefix, REDIS_URL="redis://127.0.0.1:1/0", AMQP_URL="amqp://127.0.0.1:1/")
    async with running(["dev", "--port", "0", "--backend", backend], env) as service:
        assert any("NOTHING SURVIVES EXIT" in line for line in service.log)
        assert service.api_url is not None
        url = service.api_url
        await cli(
            url, "create", "--id", "my-task-1", "--name", "My Task", "--command", "echo hello"
        )
        queued = json.loads(await cli(url, "execute", "--id", "my-task-1", "--json"))
        assert queued["status"] == "queued"
        async with httpx.AsyncClient(base_url=url) as http:
            task = await wait_for_task(http, "my-task-1", {"completed", "failed"})
        assert task["status"] == "completed"
        assert task["last_run"]["exit_code"] == 0
        assert (await cli(url, "logs", "--id", "my-task-1")).strip() == "hello"
        runs = json.loads(await cli(url, "runs", "--id", "my-task-1", "--json"))
        assert [r["run_id"] for r in runs] == [queued["run_id"]]
        assert runs[0]["output"] == "hello\n"
        assert "my-task-1" in await cli(url, "list")
        assert await service.stop(signal.SIGINT) == 0
    assert any("taskq stopped" in line for line in service.log)


async def test_dev_mode_runs_a_scheduled_task_on_time(prefix: str) -> None:
    async with running(["dev", "--port", "0"], service_env(prefix)) as service:
        assert service.api_url is not None
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            at = datetime.now(UTC) + timedelta(seconds=1)
            created = await http.post(
                "/tasks", json={"id": "later", "name": "later", "args": ["echo", "on time"]}
            )
            assert created.status_code == 201
            scheduled = await http.post("/tasks/later/schedule", json={"at": at.isoformat()})
            assert scheduled.status_code == 200
            task = await wait_for_task(http, "later", {"completed", "failed"})
            run = (await http.get(f"/tasks/later/runs/{task['last_run']['run_id']}")).json()
        started = datetime.fromisoformat(run["started_at"])
        assert started >= at, "a task never starts before its scheduled time"
        assert started - at < timedelta(milliseconds=500)
        assert run["output"] == "on time\n"
        assert await service.stop() == 0


async def test_client_errors_exit_non_zero_with_a_clear_message(prefix: str) -> None:
    async with running(["dev", "--port", "0"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        message = await cli(url, "get", "--id", "missing", expect_code=1)
        assert "task 'missing' does not exist" in message
        await cli(url, "create", "--id", "dup", "--name", "d", "--command", "true")
        message = await cli(
            url, "create", "--id", "dup", "--name", "d", "--command", "true", expect_code=1
        )
        assert "already exists" in message and "409" in message
        message = await cli(url, "create", "--name", "no program", expect_code=1)
        assert "command" in message and "400" in message
    unreachable = await cli("http://127.0.0.1:1", "list", expect_code=1)
    assert "cannot reach the taskq API" in unreachable


async def test_every_client_command_through_the_cli(prefix: str) -> None:
    async with running(["dev", "--port", "0"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        created = json.loads(
            await cli(
                url, "create", "--id", "c1", "--name", "One", "--arg", "printf", "--arg", "%s|",
                "--arg", "a b", "--env", "X=1", "--timeout", "30", "--at", at, "--json",
            )
        )  # fmt: skip
        assert created["args"] == ["printf", "%s|", "a b"]
        assert created["env"] == {"X": "1"} and created["timeout"] == 30
        assert created["scheduled_at"] is not None

        updated = json.loads(await cli(url, "update", "--id", "c1", "--name", "Uno", "--json"))
        assert updated["name"] == "Uno" and updated["args"] == created["args"]
        assert "Uno" in await cli(url, "get", "--id", "c1")

        later = (datetime.now(UTC) + timedelta(milliseconds=300)).isoformat()
        scheduled = json.loads(await cli(url, "schedule", "--id", "c1", "--at", later, "--json"))
        assert datetime.fromisoformat(scheduled["scheduled_at"]) == datetime.fromisoformat(later)
        async with httpx.AsyncClient(base_url=url) as http:
            task = await wait_for_task(http, "c1", {"completed", "failed"})
        assert task["status"] == "completed"
        run_id = task["last_run"]["run_id"]
        assert "a b|" in await cli(url, "runs", "--id", "c1", "--run", run_id)
        assert (await cli(url, "logs", "--id", "c1", "--run", run_id)).strip() == "a b|"

        listed = json.loads(await cli(url, "list", "--status", "completed", "--json"))
        assert [t["id"] for t in listed] == ["c1"]
        assert json.loads(await cli(url, "list", "--status", "pending", "--json")) == []
        assert "deleted c1" in await cli(url, "delete", "--id", "c1")
        assert "no tasks" in await cli(url, "list")
        await cli(url, "delete", "--id", "c1", expect_code=1)


async def test_failed_runs_are_retried_with_a_growing_backoff(prefix: str, tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    async with running(["dev", "--port", "0"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(
            url, "create", "--id", "flaky", "--name", "flaky", "--max-attempts", "3",
            "--retry-backoff", "0.4", "--command", "exit 1",
        )  # fmt: skip
        await cli(
            url, "create", "--id", "heals", "--name", "heals", "--max-attempts", "3",
            "--command", f"if [ -e {marker} ]; then echo ok; else touch {marker}; exit 1; fi",
            "--retry-backoff", "0.1",
        )  # fmt: skip
        await cli(url, "execute", "--id", "flaky")
        await cli(url, "execute", "--id", "heals")
        async with httpx.AsyncClient(base_url=url) as http:
            flaky = await wait_for_task(http, "flaky", {"completed", "failed"})
            heals = await wait_for_task(http, "heals", {"completed", "failed"})
            flaky_runs = list(reversed((await http.get("/tasks/flaky/runs")).json()))
            heals_runs = list(reversed((await http.get("/tasks/heals/runs")).json()))
    assert flaky["status"] == "failed" and flaky["last_run"]["attempt"] == 3
    assert [(r["attempt"], r["status"], r["exit_code"]) for r in flaky_runs] == [
        (1, "failed", 1),
        (2, "failed", 1),
        (3, "failed", 1),
    ]
    starts = [datetime.fromisoformat(r["started_at"]) for r in flaky_runs]
    ends = [datetime.fromisoformat(r["finished_at"]) for r in flaky_runs]
    gaps = [(start - end).total_seconds() for end, start in zip(ends, starts[1:], strict=False)]
    print(f"retry gaps with a 0.4 s backoff: {[round(g, 3) for g in gaps]}")
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, "half the doubled backoff at least"
    assert heals["status"] == "completed"
    assert [(r["attempt"], r["status"]) for r in heals_runs] == [(1, "failed"), (2, "completed")]


async def test_dev_mode_serves_the_queues_it_is_given(prefix: str) -> None:
    args = ["dev", "--port", "0", "--queues", "default,build=2"]
    async with running(args, service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(
            url, "create", "--id", "b", "--name", "b", "--command", "true", "--queue", "build"
        )
        await cli(url, "create", "--id", "d", "--name", "d", "--command", "true")
        await cli(
            url, "create", "--id", "o", "--name", "o", "--command", "true", "--queue", "other"
        )
        async with httpx.AsyncClient(base_url=url) as http:
            for task_id in ("b", "d", "o"):
                assert (await http.post(f"/tasks/{task_id}/execute")).status_code == 202
            for task_id, queue in (("b", "build"), ("d", "default")):
                task = await wait_for_task(http, task_id, {"completed", "failed"})
                assert task["status"] == "completed"
                run = (await http.get(f"/tasks/{task_id}/runs/{task['last_run']['run_id']}")).json()
                assert run["queue"] == queue
            # A queue this process does not serve keeps its run queued, and says so.
            queues = (await http.get("/health")).json()["queues"]
            assert queues["other"] == {"depth": 1, "consumers": 0}
            assert queues["build"]["consumers"] == 1
            assert (await http.get("/tasks/o")).json()["status"] == "pending"
        assert await service.stop() == 0

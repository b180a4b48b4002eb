"""Cancelling through the CLI stops a command wherever it runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import cli, running, service_env, wait_for_task
from tests.e2e.test_execution import alive

pytestmark = pytest.mark.e2e


async def test_a_running_command_is_stopped_in_another_process_within_a_second(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    env = service_env(prefix)
    async with (
        running(["serve", "--roles", "api,scheduler"], env, name="api") as api,
        running(["serve", "--roles", "consumer"], env, name="consumer"),
    ):
        assert api.api_url is not None
        url = api.api_url
        command = f"echo $$ > {pid_file}; exec sleep 600"
        await cli(url, "create", "--id", "long", "--name", "long", "--command", command)
        await cli(url, "execute", "--id", "long")
        await eventually(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
        pid = int(pid_file.read_text())
        asked = anyio.current_time()
        requested = json.loads(await cli(url, "cancel", "--id", "long", "--json"))
        assert requested["status"] == "running"
        async with httpx.AsyncClient(base_url=url) as http:
            task = await wait_for_task(http, "long", {"cancelled", "completed", "failed"})
            took = anyio.current_time() - asked
            [run] = (await http.get("/tasks/long/runs")).json()
    print(f"cancel across processes took {took:.2f} s")
    assert task["status"] == "cancelled"
    assert "cancel_requested" not in task, "internal bookkeeping stays out of the API"
    assert run["status"] == "cancelled"
    assert took < 1.5  # the CLI's own start-up is part of it
    assert not alive(pid)


async def test_a_cancelled_pending_task_never_runs(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    env = service_env(prefix)
    async with running(["serve", "--roles", "api,scheduler"], env, name="api") as api:
        assert api.api_url is not None
        url = api.api_url
        await cli(url, "create", "--id", "never", "--name", "n", "--command", f"touch {ran}")
        await cli(url, "execute", "--id", "never")  # published; no consumer runs yet
        cancelled = json.loads(await cli(url, "cancel", "--id", "never", "--json"))
        assert cancelled["status"] == "cancelled"
        async with running(["serve", "--roles", "consumer"], env, name="consumer") as consumer:
            # The consumer takes the message and skips it: the run is no longer queued.
            await eventually(lambda: any("not a queued run" in line for line in consumer.log))
    assert not ran.exists()


async def test_deleting_a_running_task_stops_its_command(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    async with running(["serve"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        command = f"echo $$ > {pid_file}; exec sleep 600"
        await cli(url, "create", "--id", "doomed", "--name", "d", "--command", command)
        await cli(url, "execute", "--id", "doomed")
        await eventually(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
        await cli(url, "delete", "--id", "doomed")
        pid = int(pid_file.read_text())
        await eventually(lambda: not alive(pid), within=3)


async def test_a_task_waiting_for_its_one_shot_time_is_pending_and_cancel_keeps_it_from_running(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    witness = tmp_path / "witness"
    async with (
        running(["serve"], service_env(prefix)) as service,
        httpx.AsyncClient(base_url=service.api_url or "") as http,
    ):
        assert service.api_url is not None
        for task_id, marker in (("later", ran), ("witness", witness)):
            spec = {"id": task_id, "name": task_id, "command": f"touch {marker}"}
            assert (await http.post("/tasks", json=spec)).status_code == 201
        # A few seconds ahead (the CLI takes about a second to start on a busy machine).
        at = (datetime.now(UTC) + timedelta(seconds=3)).isoformat().replace("+00:00", "Z")
        for task_id in ("later", "witness"):
            response = await http.post(f"/tasks/{task_id}/schedule", json={"at": at})
            assert response.status_code == 200 and response.json()["status"] == "pending"
        listed = json.loads(await cli(service.api_url, "list", "--status", "pending", "--json"))
        assert sorted(task["id"] for task in listed) == ["later", "witness"]
        response = await http.post("/tasks/later/cancel")
        assert response.status_code == 202, response.text
        cancelled = response.json()
        assert cancelled["status"] == "cancelled" and cancelled["scheduled_at"] is None
        # The witness, due at the same time, runs: the time has passed for both.
        await wait_for_task(http, "witness", {"completed"})
        assert (await http.get("/tasks/later/runs")).json() == []
        assert (await http.get("/tasks/later")).json()["status"] == "cancelled"
    assert witness.exists() and not ran.exists()

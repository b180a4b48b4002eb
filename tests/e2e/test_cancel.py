"""Cancelling through the CLI stops a command wherever it runs."""

from __future__ import annotations

import json
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
        assert requested["status"] == "running" and requested["cancel_requested"] is True
        async with httpx.AsyncClient(base_url=url) as http:
            task = await wait_for_task(http, "long", {"cancelled", "completed", "failed"})
            took = anyio.current_time() - asked
            [run] = (await http.get("/tasks/long/runs")).json()
    print(f"cancel across processes took {took:.2f} s")
    assert task["status"] == "cancelled" and task["cancel_requested"] is False
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

"""The process as an orchestrator sees it: exit codes, and what it says when it stops."""

from __future__ import annotations

import subprocess

import anyio
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import running, service_env, taskq_command

pytestmark = pytest.mark.e2e


async def test_a_role_that_crashes_stops_the_process_with_a_non_zero_exit(
    prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve", "--roles", "scheduler"], service_env(prefix)) as scheduler:
        # Something no code path writes: a due entry whose document is not a task.
        await servers.set(f"{prefix}task:garbled", "this is not a task document")
        await servers.zadd(f"{prefix}scheduled_tasks", {"garbled": 0})
        with anyio.fail_after(15):
            code = await scheduler.process.wait()
        await eventually(lambda: any("role scheduler crashed" in line for line in scheduler.log))
    assert code == 1, scheduler.dump()


@pytest.mark.parametrize(
    ("roles", "setting", "url"),
    [
        ("consumer", "AMQP_URL", "amqp://guest:guest@127.0.0.1:1/"),
        ("scheduler", "REDIS_URL", "redis://127.0.0.1:1/0"),
    ],
)
async def test_an_unreachable_server_at_start_is_a_clear_non_zero_exit(
    roles: str, setting: str, url: str, prefix: str
) -> None:
    env = service_env(prefix, **{setting: url})
    with anyio.fail_after(30):
        result = await anyio.run_process(
            [*taskq_command(), "serve", "--roles", roles],
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "127.0.0.1:1" in stderr or "Connect" in stderr, stderr
    assert "Traceback" not in stderr.splitlines()[-1]


async def test_a_bad_setting_is_refused_before_anything_starts(prefix: str) -> None:
    env = service_env(prefix, TASKQ_ROLES="api,worker")
    result = await anyio.run_process([*taskq_command(), "serve"], env=env, check=False)
    assert result.returncode == 1
    assert "roles must be a comma-separated subset of api,scheduler,consumer" in (
        result.stderr.decode()
    )

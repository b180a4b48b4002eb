"""Promises kept when processes die: real processes, really killed."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import running, service_env, wait_for_task

pytestmark = pytest.mark.e2e


async def test_a_run_lost_with_its_killed_consumer_is_run_again_elsewhere(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    lease = 2.0
    env = service_env(prefix, TASKQ_LEASE_SECONDS=str(lease))
    marker = tmp_path / "first-attempt-pid"
    # The first attempt never ends by itself; the second one does.
    command = f"if [ -e {marker} ]; then echo second; else echo $$ > {marker}; sleep 600; fi"
    async with running(["serve", "--roles", "api,scheduler"], env, name="api") as api:
        assert api.api_url is not None
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            await http.post("/tasks", json={"id": "victim", "name": "v", "command": command})
            async with running(["serve", "--roles", "consumer"], env, name="doomed") as doomed:
                first = (await http.post("/tasks/victim/execute")).json()
                await eventually(lambda: marker.exists() and marker.read_text().strip() != "")
                doomed.process.kill()
                killed_at = anyio.current_time()
                await doomed.process.wait()
            try:
                async with running(["serve", "--roles", "consumer"], env, name="rescuer"):
                    task = await wait_for_task(http, "victim", {"completed", "failed"}, within=30)
                    recovered_after = anyio.current_time() - killed_at
                runs = (await http.get("/tasks/victim/runs")).json()
            finally:
                # SIGKILL gave the dead consumer no chance to stop its command's group.
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.killpg(int(marker.read_text()), signal.SIGKILL)

    print(
        f"consumer killed mid-run; recovered after {recovered_after:.1f} s "
        f"(lease {lease:g} s); runs: {[(r['attempt'], r['status'], r['worker']) for r in runs]}"
    )
    assert task["status"] == "completed"
    second, lost = runs
    assert lost["run_id"] == first["run_id"]
    assert lost["status"] == "failed" and lost["error"].startswith("lost: worker")
    assert second["status"] == "completed" and second["attempt"] == 2
    assert second["output"] == "second\n"
    assert second["worker"] != lost["worker"]
    assert recovered_after < 3 * lease + 5

"""What a command's run looks like through the real service: timeouts and output caps."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import eventually
from tests.e2e.harness import running, service_env, wait_for_task
from tests.processes import alive

pytestmark = pytest.mark.e2e


async def test_a_timeout_kills_the_whole_process_tree(prefix: str, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # A shell that starts two background sleepers and a grandchild, then waits.
    command = (
        f"sleep 600 & echo $! >> {pids}; "
        f"sh -c 'sleep 600 & echo $! >> {pids}; wait' & echo $! >> {pids}; "
        "echo started; wait"
    )
    async with running(["dev", "--port", "0"], service_env(prefix)) as service:
        assert service.api_url is not None
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            body = {"id": "slow", "name": "slow", "command": command, "timeout": 1}
            assert (await http.post("/tasks", json=body)).status_code == 201
            await http.post("/tasks/slow/execute")
            task = await wait_for_task(http, "slow", {"completed", "failed"})
            [run] = (await http.get("/tasks/slow/runs", params={"output": "true"})).json()
    started = [int(pid) for pid in pids.read_text().split()]
    print(f"timed out after {run['duration']:.2f} s; processes it had started: {started}")
    assert task["status"] == "failed"
    assert run["timed_out"] is True and run["error"] == "timed out after 1 s"
    assert run["exit_code"] == 143  # SIGTERM
    assert run["output"] == "started\n"
    assert len(started) == 3
    await eventually(lambda: not any(alive(pid) for pid in started), within=5)
    assert os.getpid() not in started


async def test_output_is_capped_keeping_its_head_and_tail(prefix: str) -> None:
    env = service_env(prefix, TASKQ_OUTPUT_LIMIT="4096")
    # About 10 MB: the first and last lines must survive, the middle must not.
    command = "echo FIRST; yes middle | head -n 1000000; echo LAST"
    async with running(["dev", "--port", "0"], env) as service:
        assert service.api_url is not None
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            await http.post("/tasks", json={"id": "loud", "name": "loud", "command": command})
            await http.post("/tasks/loud/execute")
            task = await wait_for_task(http, "loud", {"completed", "failed"})
            [run] = (await http.get("/tasks/loud/runs", params={"output": "true"})).json()
    assert task["status"] == "completed"
    assert run["truncated"] is True
    output: str = run["output"]
    assert output.startswith("FIRST\nmiddle\n") and output.endswith("middle\nLAST\n")
    assert "bytes of output omitted" in output
    assert len(output.encode()) < 4096 + 100

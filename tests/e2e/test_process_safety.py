"""What a command can do to the service, and what the service's death does to commands:
no orphans after a SIGKILL, no secrets in reach, no hijacked ``sh``."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import ServiceProcess, running, service_env, wait_for_task
from tests.processes import alive

pytestmark = pytest.mark.e2e

SERVE = ["serve"]
SERVE_PROCESSES = ["serve", "--processes", "2"]
DEV = ["dev", "--port", "0"]


async def read_pids(path: Path, count: int) -> list[int]:
    """The ``count`` pids a command wrote to ``path`` (written whole, by a rename)."""
    pids: list[int] = []

    async def written() -> bool:
        nonlocal pids
        if not await anyio.Path(path).exists():
            return False
        pids = [int(word) for word in (await anyio.Path(path).read_text()).split()]
        return len(pids) == count

    await eventually(written, within=20)
    return pids


async def start_command(service: ServiceProcess, command: str) -> None:
    assert service.api_url is not None
    async with httpx.AsyncClient(base_url=service.api_url) as http:
        body = {"id": "job", "name": "job", "command": command}
        assert (await http.post("/tasks", json=body)).status_code == 201
        assert (await http.post("/tasks/job/execute")).status_code == 202


@pytest.mark.parametrize("args", [SERVE, DEV], ids=["serve", "dev"])
async def test_a_command_does_not_outlive_its_consumer_killed_with_sigkill(
    args: list[str], prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    # The shell and a background sleep; the pids go to a file renamed into place.
    command = f'sleep 300 & echo $$ $! > "{pids}.tmp" && mv "{pids}.tmp" "{pids}"; wait'
    async with running(args, service_env(prefix)) as service:
        await start_command(service, command)
        shell, sleeper = await read_pids(pids, 2)
        assert alive(shell) and alive(sleeper)
        service.process.send_signal(signal.SIGKILL)  # the consumer alone, not its group
        killed_at = anyio.current_time()
        with anyio.fail_after(5):
            await service.process.wait()
        try:
            await eventually(lambda: not alive(shell) and not alive(sleeper), within=3)
            print(f"command gone {anyio.current_time() - killed_at:.2f} s after the SIGKILL")
        finally:
            for pid in (shell, sleeper):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


async def test_sh_is_not_looked_up_through_the_tasks_path(prefix: str, tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    fake_sh = evil / "sh"
    fake_sh.write_text("#!/bin/sh\necho hijacked\n")
    fake_sh.chmod(0o755)
    async with running(DEV, service_env(prefix)) as service:
        assert service.api_url is not None
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            body = {
                "id": "path",
                "name": "path",
                "command": "echo the real shell",
                "env": {"PATH": str(evil)},
            }
            assert (await http.post("/tasks", json=body)).status_code == 201
            await http.post("/tasks/path/execute")
            task = await wait_for_task(http, "path", {"completed", "failed"})
            [run] = (await http.get("/tasks/path/runs", params={"output": "true"})).json()
    assert (task["status"], run["output"]) == ("completed", "the real shell\n")


# Prints the command line and the environment of its parent (the consumer), of each of
# its ancestors, and of every process whose command line mentions taskq or the watchdog.
DUMP_PROCESSES = r"""
dump() { echo "== $1: $(tr '\0' ' ' < /proc/$1/cmdline)"; tr '\0' '\n' < /proc/$1/environ; }
dump $PPID
pid=$PPID
while [ "$pid" -gt 1 ]; do dump $pid; pid=$(awk '/^PPid:/ {print $2}' /proc/$pid/status); done
for dir in /proc/[0-9]*; do
  if tr '\0' ' ' < $dir/cmdline 2>/dev/null | grep -q -e taskq -e process_groups; then
    dump ${dir#/proc/}
  fi
done
"""


@pytest.mark.parametrize(
    "args", [SERVE, SERVE_PROCESSES, DEV], ids=["serve", "serve-processes", "dev"]
)
async def test_commands_cannot_read_the_servers_secrets_through_proc(
    args: list[str], prefix: str, servers: redis.Redis
) -> None:
    token = f"token-{uuid.uuid4().hex}"
    password = f"password-{uuid.uuid4().hex}"
    env = service_env(prefix, TASKQ_API_TOKENS=token)
    if args != DEV:
        # A flag, so in argv; the local Redis takes any password for its default user.
        args = [*args, "--redis-url", f"redis://default:{password}@127.0.0.1:6379/0"]
    async with running(args, env) as service:
        assert service.api_url is not None
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=service.api_url, headers=headers) as http:
            body = {"id": "snoop", "name": "snoop", "command": DUMP_PROCESSES}
            assert (await http.post("/tasks", json=body)).status_code == 201
            await http.post("/tasks/snoop/execute")
            task = await wait_for_task(http, "snoop", {"completed", "failed"})
            [run] = (await http.get("/tasks/snoop/runs", params={"output": "true"})).json()
    dump = run["output"]
    assert task["status"] == "completed", dump
    # It did read the consumer's environment and the watchdog's, just not the secrets.
    assert f"TASKQ_KEY_PREFIX={prefix}" in dump
    assert " serve" in dump or " dev" in dump
    assert "process_groups.py" in dump
    assert token not in dump
    assert password not in dump

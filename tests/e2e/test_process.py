"""The process as an orchestrator sees it: exit codes, and what it says when it stops."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import ServiceProcess, running, service_env, taskq_command
from tests.processes import alive, children

pytestmark = pytest.mark.e2e


async def test_a_role_that_crashes_stops_the_process_with_a_non_zero_exit(
    prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve", "--roles", "scheduler"], service_env(prefix)) as scheduler:
        # Something no code path writes, and no outage: a key of taskq's of the wrong type
        # (the claims hash as a string), which the next claim of a due entry trips over.
        await servers.set(f"{prefix}claims", "this is not a hash")
        await servers.zadd(f"{prefix}scheduled_tasks", {"due": 0})
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def holds_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM or has it blocked: from then on, a
    SIGTERM is taskq's to handle (before, the interpreter is still starting)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    masks = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Sig"))
    bit = 1 << (signal.SIGTERM - 1)
    return bool((int(masks["SigBlk"], 16) | int(masks["SigCgt"], 16)) & bit)


@pytest.mark.parametrize(
    ("command", "moment"),
    [
        *(("serve", moment) for moment in ("health", 0.0, 0.05, 0.2, 0.5, 1.0)),
        # The API answers before the consumer processes are ready.
        *(("serve --processes 2", moment) for moment in ("health", 0.5, 1.0, 1.5)),
        ("dev", "health"),
    ],
)
async def test_sigterm_at_any_moment_of_the_start_up_stops_cleanly_with_exit_code_0(
    command: str, moment: str | float, prefix: str, servers: redis.Redis
) -> None:
    port = free_port()
    process = await anyio.open_process(
        [*taskq_command(), *command.split()],
        env=service_env(prefix, SERVER_PORT=str(port)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    service = ServiceProcess(process, command)

    async def health_answers() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                answer = await http.get(f"http://127.0.0.1:{port}/health")
        except httpx.TransportError:
            return False
        return answer.status_code == 200

    code: int | None = None
    started: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.collect_log)
        await eventually(lambda: holds_sigterm(process.pid), every=0.001)
        if moment == "health":
            await eventually(health_answers, every=0.005, within=20)
        else:
            await anyio.sleep(float(moment))  # a moment of the start-up, not a wait for state
        started = children(process.pid)
        code = await service.stop()
    assert code == 0, service.dump()
    assert not [pid for pid in started if alive(pid)], "a child process outlived the service"
    assert not [line for line in service.log if "Traceback" in line or "crashed" in line], (
        service.dump()
    )

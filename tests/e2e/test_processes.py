"""``taskq serve --processes N``: one service, its consumer role as N processes that it
starts, stops in order, and reports the crash of; none outlives it."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import ServiceProcess, running, service_env, wait_for_task
from tests.e2e.test_process_safety import read_pids
from tests.processes import alive, children

pytestmark = pytest.mark.e2e

TWO_PROCESSES = ["serve", "--processes", "2"]


def consumer_processes(service: ServiceProcess) -> list[int]:
    """The consumer processes of ``service`` (its children started with ``--supervised``)."""
    pids: list[int] = []
    for pid in children(service.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--supervised" in cmdline:
            pids.append(pid)
    return pids


def worker_pid(run: dict[str, Any]) -> int:
    """The pid of the process that ran ``run`` (its ``worker`` is ``host:pid``)."""
    return int(run["worker"].rsplit(":", 1)[1])


async def create_and_execute(http: httpx.AsyncClient, commands: dict[str, str]) -> None:
    for task_id, command in commands.items():
        body = {"id": task_id, "name": task_id, "command": command}
        assert (await http.post("/tasks", json=body)).status_code == 201
    for task_id in commands:
        assert (await http.post(f"/tasks/{task_id}/execute")).status_code == 202


async def running_run(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    """The run of ``task_id`` once it is running."""
    runs: list[dict[str, Any]] = []

    async def started() -> bool:
        nonlocal runs
        runs = (await http.get(f"/tasks/{task_id}/runs")).json()
        return bool(runs) and runs[0]["status"] == "running"

    await eventually(started, within=20, every=0.05)
    return runs[0]


async def test_a_batch_runs_on_two_consumer_processes_each_task_exactly_once(
    prefix: str, servers: redis.Redis
) -> None:
    env = service_env(prefix, TASKQ_CONCURRENCY="2")
    ids = [f"batch-{number}" for number in range(40)]
    async with running(TWO_PROCESSES, env) as service:
        assert service.api_url is not None
        consumers = consumer_processes(service)
        assert len(consumers) == 2
        [ready] = [line for line in service.log if "taskq ready:" in line]
        assert ready.endswith(", scheduler, 2 consumer processes (2 at a time each)"), ready
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            await create_and_execute(http, dict.fromkeys(ids, "sleep 0.2"))
            runs: list[dict[str, Any]] = []
            for task_id in ids:
                task = await wait_for_task(http, task_id, {"completed", "failed"}, within=60)
                assert task["status"] == "completed", task
                runs += (await http.get(f"/tasks/{task_id}/runs")).json()
        assert await service.stop(signal.SIGTERM) == 0
    assert sorted(run["task_id"] for run in runs) == sorted(ids), "each task ran exactly once"
    assert {run["status"] for run in runs} == {"completed"}
    by_process = {pid: sum(worker_pid(run) == pid for run in runs) for pid in consumers}
    print(f"40 tasks on 2 consumer processes: {by_process}")
    assert {worker_pid(run) for run in runs} == set(consumers)


@pytest.mark.parametrize("everyone", [False, True], ids=["parent", "every-process"])
async def test_sigterm_drains_every_consumer_process_and_exits_0(
    everyone: bool, prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    """SIGTERM to the main process; or, as systemd does, to every process of the service
    (here the consumer processes get theirs once they already stop at the parent's
    request, which must not make it a second signal, one that stops them now)."""
    grace = 2.0
    # One command per consumer process: each holds one of the two.
    env = service_env(prefix, TASKQ_SHUTDOWN_GRACE=str(grace), TASKQ_CONCURRENCY="1")
    short_started, long_pid = tmp_path / "short", tmp_path / "long"
    commands = {
        "short": f"touch {short_started}; sleep 1; echo short done",
        "long": f"echo $$ > {long_pid}.tmp && mv {long_pid}.tmp {long_pid}; sleep 600",
    }
    async with running(TWO_PROCESSES, env) as service:
        assert service.api_url is not None
        consumers = consumer_processes(service)
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            await create_and_execute(http, commands)
            runs = [await running_run(http, task_id) for task_id in commands]
            assert {worker_pid(run) for run in runs} == set(consumers), "one on each"
            [shell] = await read_pids(long_pid, 1)
            await eventually(short_started.exists)
            stopped_at = anyio.current_time()
            service.process.send_signal(signal.SIGTERM)
            if everyone:
                await eventually(lambda: _count(service.log, "asked this consumer process") == 2)
                for pid in consumers:
                    os.kill(pid, signal.SIGTERM)
            with anyio.fail_after(grace + 15):
                code = await service.process.wait()
            took = anyio.current_time() - stopped_at
    print(f"SIGTERM, 2 consumer processes each running a command: exit {code} after {took:.1f} s")
    assert code == 0, service.dump()
    assert _count(service.log, "stopping now") == 0, service.dump()
    assert grace <= took < grace + 5
    assert not [pid for pid in [*consumers, shell] if alive(pid)], "no process left behind"
    short = json.loads(await servers.get(f"{prefix}task:short") or "{}")
    long = json.loads(await servers.get(f"{prefix}task:long") or "{}")
    assert short["status"] == "completed", "finished within the grace period"
    assert long["status"] == "pending", "given back, not lost and not stuck running"


async def test_a_killed_consumer_process_is_a_crash_and_leaves_no_command_behind(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    command = f'sleep 300 & echo $$ $! > "{pids}.tmp" && mv "{pids}.tmp" "{pids}"; wait'
    async with running(TWO_PROCESSES, service_env(prefix)) as service:
        assert service.api_url is not None
        consumers = consumer_processes(service)
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            await create_and_execute(http, {"job": command})
            victim = worker_pid(await running_run(http, "job"))
        shell, sleeper = await read_pids(pids, 2)
        os.kill(victim, signal.SIGKILL)  # as the OOM killer would
        with anyio.fail_after(20):
            code = await service.process.wait()
        await eventually(lambda: not alive(shell) and not alive(sleeper), within=3)
        crashed = re.compile(rf"role consumer-[12] crashed: .* {victim} was killed by SIGKILL")
        assert any(crashed.search(line) for line in service.log), service.dump()
        reported = re.compile("CRITICAL .*role consumer.* crashed")
        assert len([line for line in service.log if reported.search(line)]) == 1, "only once"
    assert code == 1
    assert not [pid for pid in consumers if alive(pid)]


async def test_consumer_processes_stop_in_order_when_their_parent_is_killed(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    grace = 2.0
    env = service_env(prefix, TASKQ_SHUTDOWN_GRACE=str(grace))
    pids = tmp_path / "pids"
    command = f'echo $$ > "{pids}.tmp" && mv "{pids}.tmp" "{pids}"; sleep 600'
    async with running(TWO_PROCESSES, env) as service:
        assert service.api_url is not None
        consumers = consumer_processes(service)
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            await create_and_execute(http, {"job": command})
            await running_run(http, "job")
        [shell] = await read_pids(pids, 1)
        service.process.send_signal(signal.SIGKILL)
        killed_at = anyio.current_time()
        await eventually(lambda: not [pid for pid in consumers if alive(pid)], within=grace + 10)
        took = anyio.current_time() - killed_at
    print(f"parent killed: its consumer processes gone {took:.1f} s later (grace {grace:g} s)")
    assert not alive(shell)
    # Stopped in order, not killed: the interrupted run was given back at once.
    task = json.loads(await servers.get(f"{prefix}task:job") or "{}")
    assert task["status"] == "pending"


def _count(log: list[str], text: str) -> int:
    return sum(text in line for line in log)


@pytest.mark.parametrize(
    ("asked", "loop"),
    [([], "uvloop"), (["--backend", "asyncio"], "asyncio")],
    ids=["default", "asyncio"],
)
async def test_every_process_runs_on_the_event_loop_serve_was_given(
    asked: list[str], loop: str, prefix: str, servers: redis.Redis
) -> None:
    """uvloop by default; ``--backend asyncio`` reaches the consumer processes too (they
    are started with the parent's loop), and commands run on either."""
    env = service_env(prefix, TASKQ_CONCURRENCY="2")
    env.pop("TASKQ_BACKEND", None)
    async with running([*TWO_PROCESSES, *asked], env) as service:
        assert service.api_url is not None
        loops = [
            line.rsplit("event loop: ", 1)[1] for line in service.log if "event loop: " in line
        ]
        assert loops == [loop] * 3, service.log
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            ids = [f"on-{loop}-{number}" for number in range(6)]
            await create_and_execute(http, {task_id: f"echo {task_id}" for task_id in ids})
            for task_id in ids:
                task = await wait_for_task(http, task_id, {"completed", "failed"}, within=30)
                assert task["status"] == "completed", task
                run_id = task["last_run"]["run_id"]
                run = (await http.get(f"/tasks/{task_id}/runs/{run_id}")).json()
                assert run["output"] == f"{task_id}\n"
        assert await service.stop(signal.SIGTERM) == 0

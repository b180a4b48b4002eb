"""Starting real ``taskq`` processes and talking to them the way a user does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.abc import Process

from tests.conftest import AMQP_URL, REDIS_URL, eventually

READY = re.compile(r"taskq ready: (.*)")
API_URL = re.compile(r"api on (http://[^\s,\"]+)")  # also inside a JSON log line
START_SECONDS = 20


def taskq_command() -> list[str]:
    """The installed ``taskq`` console script of this environment."""
    script = Path(sys.executable).with_name("taskq")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def service_env(prefix: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": REDIS_URL,
            "AMQP_URL": AMQP_URL,
            "TASKQ_KEY_PREFIX": prefix,
            "SERVER_PORT": "0",
            "TASKQ_SHUTDOWN_GRACE": "5",
            "TASKQ_CONCURRENCY": "4",
            # One process unless a test asks for more (`--processes`).
            "TASKQ_PROCESSES": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class ServiceProcess:
    """A running ``taskq serve``/``taskq dev`` whose log is collected as it goes."""

    def __init__(self, process: Process, name: str) -> None:
        self.process = process
        self.name = name
        self.log: list[str] = []
        self.api_url: str | None = None
        self._ready = anyio.Event()

    async def collect_log(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.log.append(line)
                if ready := READY.search(line):
                    if url := API_URL.search(ready.group(1)):
                        self.api_url = url.group(1)
                    self._ready.set()
        self._ready.set()  # exited before it was ready: wait_ready reports it

    async def wait_ready(self) -> None:
        with anyio.fail_after(START_SECONDS):
            await self._ready.wait()
        if self.process.returncode is not None:
            raise AssertionError(f"{self.name} exited early:\n" + "\n".join(self.log))

    async def stop(self, signum: signal.Signals = signal.SIGTERM, deadline: float = 15) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signum)
        with anyio.fail_after(deadline):
            return await self.process.wait()

    def dump(self) -> str:
        return f"--- log of {self.name} ---\n" + "\n".join(self.log)


@asynccontextmanager
async def running(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    name: str = "taskq",
    command: Sequence[str] | None = None,
) -> AsyncGenerator[ServiceProcess]:
    """Start ``taskq ARGS`` (``command`` in place of ``taskq``: something that runs it),
    wait until it reports ready, and stop it on exit."""
    process = await anyio.open_process(
        [*(command or taskq_command()), *args],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    service = ServiceProcess(process, name)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service.collect_log)
        try:
            await service.wait_ready()
            yield service
        except BaseException:
            print(service.dump())
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                await process.wait()


async def cli(
    api_url: str,
    *args: str,
    expect_code: int = 0,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
) -> str:
    """Run a ``taskq`` client command against ``api_url`` (``stdin`` as its standard input);
    return its stdout (its stderr when ``expect_code`` is not 0). ``env`` adds to or
    overrides this process's environment."""
    env = {**os.environ, **(env or {}), "TASKQ_API_URL": api_url}
    result = await anyio.run_process([*taskq_command(), *args], input=stdin, env=env, check=False)
    output = result.stdout.decode()
    assert result.returncode == expect_code, (
        f"taskq {' '.join(args)} exited {result.returncode}:\n{output}\n{result.stderr.decode()}"
    )
    return output if expect_code == 0 else result.stderr.decode()


async def wait_for_task(
    http: httpx.AsyncClient, task_id: str, statuses: set[str], *, within: float = 20
) -> dict[str, Any]:
    """Poll the API until the task reaches one of ``statuses`` (bounded)."""
    task: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal task
        task = (await http.get(f"/tasks/{task_id}")).json()
        return task["status"] in statuses

    await eventually(reached, within=within, every=0.02)
    return task

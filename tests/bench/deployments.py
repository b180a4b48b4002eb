"""Running a taskq deployment described on the command line, and talking to its API with
a client that is not the bottleneck.

A deployment is one or more ``taskq`` command lines joined by ``+``, e.g.
``serve`` (one process, every role) or
``serve --roles api,scheduler + serve --roles consumer + serve --roles consumer``
(the split deployment). Any ``serve`` option can be added, e.g. ``serve --processes 2``.

The client is aiohttp: httpx spends several ms of client CPU a request on these machines
(``../shared/peers/README.md``), so an httpx client would measure itself.
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import redis.asyncio as redis

from app.adapters.amqp_broker import delete_amqp_layout
from tests.conftest import AMQP_URL, REDIS_URL, delete_keys, eventually
from tests.e2e.harness import ServiceProcess, running, service_env

ONE_PROCESS = "serve"
SPLIT = "serve --roles api,scheduler + serve --roles consumer + serve --roles consumer"

HARNESS_SETTINGS = ("TASKQ_CONCURRENCY", "TASKQ_PROCESSES")
"""What the test harness sets for its own speed and a benchmark leaves at taskq's default."""
IN_FLIGHT = 32
"""Requests a bulk client keeps in flight (as ``../shared/peers/taskq_bench.py``)."""


def label(deployment: str) -> str:
    """How a report names ``deployment``."""
    if deployment == SPLIT:
        return "taskq split (api+scheduler + 2 x serve --roles consumer)"
    return f"taskq {deployment}"


def command_lines(deployment: str) -> list[list[str]]:
    """The ``taskq`` arguments of each process of ``deployment`` (``+``-separated)."""
    processes: list[list[str]] = [[]]
    for word in shlex.split(deployment):
        if word == "+":
            processes.append([])
        else:
            processes[-1].append(word)
    if not all(processes):
        raise ValueError(f"an empty process in deployment {deployment!r}")
    return processes


def bench_env(prefix: str) -> dict[str, str]:
    """The environment of a benchmarked process: the local servers under ``prefix``,
    an ephemeral port, and taskq's default settings otherwise (the test harness's
    process count and concurrency are dropped)."""
    env = service_env(prefix)
    for name in HARNESS_SETTINGS:
        env.pop(name, None)
    return env


@dataclass
class Deployment:
    processes: list[ServiceProcess]
    api_url: str

    @property
    def pids(self) -> list[int]:
        return [service.process.pid for service in self.processes]


@asynccontextmanager
async def deployed(deployment: str, env: Mapping[str, str]) -> AsyncGenerator[Deployment]:
    """Start every process of ``deployment``, wait until each is ready, and stop them
    all with SIGTERM (a drain, as in production) on exit."""
    async with AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(running(args, env, name=" ".join(args)))
            for args in command_lines(deployment)
        ]
        urls = [service.api_url for service in processes if service.api_url]
        if not urls:
            raise ValueError(f"no process of {deployment!r} serves the API")
        try:
            yield Deployment(processes, urls[0])
        finally:
            with anyio.CancelScope(shield=True):
                for service in processes:
                    service.process.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    for service in processes:
                        await service.process.wait()


class Api:
    """JSON calls to a taskq API over one aiohttp session."""

    def __init__(self, base_url: str, *, in_flight: int = IN_FLIGHT) -> None:
        self._base = base_url
        self._limit = anyio.Semaphore(in_flight)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=in_flight),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()

    async def call(
        self, method: str, path: str, *, json: Any = None, params: Mapping[str, str] | None = None
    ) -> tuple[int, Any, Mapping[str, str]]:
        """(status, decoded body, headers) of one request."""
        async with (
            self._limit,
            self._session.request(method, self._base + path, json=json, params=params) as answer,
        ):
            return answer.status, await answer.json(content_type=None), answer.headers

    async def create_all(self, bodies: Sequence[dict[str, Any]]) -> None:
        """``POST /tasks`` each body, ``IN_FLIGHT`` at a time; fail on any refusal."""

        async def create(body: dict[str, Any]) -> None:
            status, answer, _ = await self.call("POST", "/tasks", json=body)
            if status != 201:
                raise AssertionError(f"POST /tasks {body['id']}: {status} {answer}")

        async with anyio.create_task_group() as tg:
            for body in bodies:
                tg.start_soon(create, body)

    async def runs_of(self, task_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Each task's runs, newest first."""
        runs: dict[str, list[dict[str, Any]]] = {}

        async def fetch(task_id: str) -> None:
            _, runs[task_id], _ = await self.call("GET", f"/tasks/{task_id}/runs")

        async with anyio.create_task_group() as tg:
            for task_id in task_ids:
                tg.start_soon(fetch, task_id)
        return runs


async def wait_finished(prefix: str, count: int, *, within: float) -> None:
    """Wait until ``count`` tasks under ``prefix`` are completed or failed, asking Redis
    (cheap) rather than the API (which would compete with the service for the CPU)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:

        async def finished() -> bool:
            async with client.pipeline(transaction=False) as pipe:
                pipe.zcard(f"{prefix}status:completed")
                pipe.zcard(f"{prefix}status:failed")
                completed, failed = await pipe.execute()
            return completed + failed >= count

        await eventually(finished, within=within, every=0.05)
    finally:
        await client.aclose()


async def forget(prefix: str) -> None:
    """Delete every Redis key and AMQP queue/exchange a benchmark made under ``prefix``."""
    with anyio.CancelScope(shield=True):
        await delete_keys(prefix)
        await delete_amqp_layout(AMQP_URL, prefix=prefix)

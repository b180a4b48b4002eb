"""``GET /events`` and ``taskq events`` through the real processes, Redis and RabbitMQ."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis
from anyio.abc import Process

from cli.client import ApiClient, ApiError
from tests.e2e.harness import cli, running, service_env, taskq_command, wait_for_task

pytestmark = pytest.mark.e2e

WAIT = 30
Seen = list[tuple[str, str, dict[str, Any]]]
"""(event, id, data) of each event received."""


async def receive_until(events: AsyncIterator[tuple[str, str, Any]], seen: Seen, last: str) -> None:
    """Add what comes to ``seen`` until an event whose data says ``last`` (as
    ``"type task_id outcome attempt"``, the outcome where there is one) has come."""
    with anyio.fail_after(WAIT):
        async for event, event_id, data in events:
            seen.append((event, event_id, data))
            if f"{step(data)} {data.get('attempt', '')}".strip() == last:
                return
    raise AssertionError(f"the stream ended before {last!r}: {seen}")


def step(data: dict[str, Any]) -> str:
    return " ".join(str(data[key]) for key in ("type", "task_id", "outcome") if key in data)


def steps_of(seen: Seen, task_id: str) -> list[str]:
    return [
        f"{step(data)} {data.get('attempt', '')}".strip()
        for _, _, data in seen
        if data["task_id"] == task_id
    ]


async def test_a_follower_sees_every_step_of_a_run_and_resumes_without_loss_or_repeat(
    prefix: str, servers: redis.Redis
) -> None:
    async with (
        running(["serve"], service_env(prefix)) as service,
        httpx.AsyncClient(base_url=service.api_url or "", timeout=WAIT) as http,
    ):
        url = service.api_url
        assert url is not None
        client = ApiClient(http)
        seen: Seen = []
        stream = client.events(after="0-0", task_id=None)  # from the start: nothing yet
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive_until, stream, seen, "run.finished bad failed 2")
            await cli(url, "create", "--id", "ok", "--name", "ok", "--command", "true")
            await cli(url, "execute", "--id", "ok")
            await wait_for_task(http, "ok", {"completed"})
            body = {"id": "bad", "name": "bad", "command": "exit 3", "max_attempts": 2}
            await http.post("/tasks", json={**body, "retry_backoff": 0.1})
            await cli(url, "execute", "--id", "bad")
            await wait_for_task(http, "bad", {"failed"})
        # (``receive_until`` returned at the last step: the follower disconnects.)
        await stream.aclose()

        assert steps_of(seen, "ok") == [
            "task.created ok",
            "run.queued ok 1",
            "run.started ok 1",
            "run.finished ok completed 1",
        ]
        assert steps_of(seen, "bad") == [
            "task.created bad",
            "run.queued bad 1",
            "run.started bad 1",
            "run.finished bad failed 1",
            "run.queued bad 2",
            "run.started bad 2",
            "run.finished bad failed 2",
        ]
        ids = [event_id for _, event_id, _ in seen]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))), "in order"
        finished = next(data for event, _, data in seen if event == "run.finished")
        assert finished["exit_code"] == 0 and finished["run_status"] == "completed"
        assert finished["duration"] >= 0 and finished["task_status"] == "completed"

        # While nobody follows: more happens.
        await cli(url, "update", "--id", "ok", "--name", "renamed")
        await cli(url, "delete", "--id", "bad")
        await cli(url, "execute", "--id", "ok")
        await wait_for_task(http, "ok", {"completed"})

        resumed: Seen = []
        stream = client.events(after=ids[-1], task_id=None)  # as Last-Event-ID
        await receive_until(stream, resumed, "run.finished ok completed 1")
        await stream.aclose()
        assert [step(data) for _, _, data in resumed] == [
            "task.updated ok",
            "task.deleted bad",
            "run.queued ok",
            "run.started ok",
            "run.finished ok completed",
        ]
        assert set(ids).isdisjoint(event_id for _, event_id, _ in resumed)
        assert await servers.xlen(f"{prefix}events") == len(seen) + len(resumed)

        # The wire format, as a browser's EventSource reads it; without a resume point,
        # from the request on (its answer's headers come once that point is fixed).
        async with http.stream("GET", "/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            await cli(url, "create", "--id", "new", "--name", "new", "--command", "true")
            lines = response.aiter_lines()
            with anyio.fail_after(WAIT):
                first = [await anext(lines) for _ in range(3)]
        assert first[0].startswith("id: ") and first[1] == "event: task.created"
        data = json.loads(first[2].removeprefix("data: "))
        assert (data["id"], data["task_id"]) == (first[0].removeprefix("id: "), "new")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def read_lines(process: Process, lines: list[str], count: int) -> None:
    """Read the process's stdout until it printed ``count`` lines in all (bounded)."""
    assert process.stdout is not None
    buffer = b""
    with anyio.fail_after(WAIT):
        while len(lines) < count:
            buffer += await process.stdout.receive()
            *complete, buffer = buffer.split(b"\n")
            lines += [line.decode() for line in complete]
    assert not buffer, "a line was cut"


async def test_taskq_events_prints_each_event_and_reconnects_where_it_left_off(
    prefix: str, servers: redis.Redis
) -> None:
    port = free_port()
    env = service_env(prefix, SERVER_PORT=str(port))
    url = f"http://127.0.0.1:{port}"
    async with running(["serve"], env) as service:
        await cli(url, "create", "--id", "other", "--name", "o", "--command", "true")
        await cli(url, "create", "--id", "t", "--name", "t", "--command", "echo hi")
        follower = await anyio.open_process(
            [*taskq_command(), "events", "--task", "t", "--after", "0-0", "--json"],
            env={**os.environ, "TASKQ_API_URL": url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        async with follower:
            lines: list[str] = []
            await read_lines(follower, lines, 1)
            await cli(url, "execute", "--id", "t")
            await read_lines(follower, lines, 4)
            assert await service.stop(signal.SIGTERM) == 0  # the connection drops

            # The follower waits for the server to come back, on the same port.
            async with running(["serve"], env) as service_again:
                await cli(url, "execute", "--id", "t")
                await read_lines(follower, lines, 7)
                follower.send_signal(signal.SIGINT)
                with anyio.fail_after(WAIT):
                    await follower.wait()
                await service_again.stop()
    events = [json.loads(line) for line in lines]
    assert [(e["type"], e["task_id"]) for e in events] == [
        ("task.created", "t"),
        ("run.queued", "t"),
        ("run.started", "t"),
        ("run.finished", "t"),
        ("run.queued", "t"),
        ("run.started", "t"),
        ("run.finished", "t"),
    ]
    assert len({e["id"] for e in events}) == 7, "no event twice"
    assert events[3]["outcome"] == events[6]["outcome"] == "completed"


async def test_taskq_events_in_words(prefix: str, servers: redis.Redis) -> None:
    async with running(["serve"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(url, "create", "--id", "w", "--name", "w", "--command", "exit 2")
        follower = await anyio.open_process(
            [*taskq_command(), "events", "--after", "0-0"],
            env={**os.environ, "TASKQ_API_URL": url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        async with follower:
            lines: list[str] = []
            await cli(url, "execute", "--id", "w")
            await read_lines(follower, lines, 4)
            follower.send_signal(signal.SIGINT)
            with anyio.fail_after(WAIT):
                await follower.wait()
    created, queued, started, finished = lines
    assert "task.created" in created and created.endswith("  w  created")
    assert "run.queued" in queued and "(attempt 1)" in queued
    assert "run.started" in started and "running" in started
    assert "run.finished" in finished and "failed (exit 2," in finished


async def test_events_need_a_token_when_tokens_are_set(prefix: str) -> None:
    env = service_env(prefix, TASKQ_API_TOKENS="secret")
    async with running(["dev", "--port", "0"], env) as service:
        assert service.api_url is not None
        url = service.api_url
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/events")).status_code == 401
            with pytest.raises(ApiError, match="401"):
                async for _ in ApiClient(http).events(after=None, task_id=None):
                    pass
        message = await cli(url, "events", expect_code=1, env={"TASKQ_TOKEN": ""})
        assert "401" in message and "TASKQ_TOKEN" in message, message
        await cli(url, "create", "--id", "a", "--name", "a", "--command", "true",
                  env={"TASKQ_TOKEN": "secret"})  # fmt: skip
        follower = await anyio.open_process(
            [*taskq_command(), "events", "--after", "0-0", "--json"],
            env={**os.environ, "TASKQ_API_URL": url, "TASKQ_TOKEN": "secret"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        async with follower:
            lines: list[str] = []
            await read_lines(follower, lines, 1)
            follower.send_signal(signal.SIGINT)
            with anyio.fail_after(WAIT):
                await follower.wait()
    assert json.loads(lines[0])["type"] == "task.created"


async def test_taskq_events_says_when_nothing_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    message = await cli(url, "events", expect_code=1)
    assert "cannot reach the taskq API" in message or "broke" in message, message

"""`taskq logs --follow` and the output event stream, through the real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as redis
from anyio.abc import ByteReceiveStream

from tests.e2e.harness import cli, running, service_env, taskq_command, wait_for_task

pytestmark = pytest.mark.e2e

WAIT = 20


async def read_until(stream: ByteReceiveStream, seen: bytearray, expected: bytes) -> None:
    with anyio.fail_after(WAIT):
        while expected not in seen:
            seen += await stream.receive()


async def test_logs_follow_prints_lines_while_the_command_still_runs(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    go_on = tmp_path / "go-on"
    # The command prints a line, then blocks until the test has seen that line arrive.
    script = f"echo first; while [ ! -e {go_on} ]; do sleep 0.05; done; echo second; exit 4"
    async with running(["serve"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(url, "create", "--id", "live", "--name", "live", "--command", script)
        run_id = json.loads(await cli(url, "execute", "--id", "live", "--json"))["run_id"]
        env = {**os.environ, "TASKQ_API_URL": url}
        follower = await anyio.open_process(
            [*taskq_command(), "logs", "--id", "live", "--follow"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        async with follower, httpx.AsyncClient(base_url=url) as http:
            assert follower.stdout is not None and follower.stderr is not None
            seen = bytearray()
            await read_until(follower.stdout, seen, b"first\n")
            # The line came while the command was still running, through Redis.
            assert (await http.get("/tasks/live")).json()["status"] == "running"
            assert await servers.exists(f"{prefix}output:{run_id}")

            # A second follower, reading the event stream itself.
            output_url = f"/tasks/live/runs/{run_id}/output"
            async with http.stream("GET", output_url, params={"follow": "true"}) as sse:
                assert sse.headers["content-type"].startswith("text/event-stream")
                lines = sse.aiter_lines()
                with anyio.fail_after(WAIT):
                    assert await anext(lines) == "event: output"
                    assert json.loads((await anext(lines)).removeprefix("data: ")) == {
                        "text": "first\n"
                    }
                go_on.touch()
                with anyio.fail_after(WAIT):
                    events = [line async for line in lines if line.startswith("event:")]
            assert events[-1] == "event: end"

            with anyio.fail_after(WAIT):
                async for chunk in follower.stdout:
                    seen += chunk
                errors = b"".join([chunk async for chunk in follower.stderr])
                assert await follower.wait() == 0
            task = await wait_for_task(http, "live", {"failed"})
            # Reading an ended run's output again comes from its record.
            assert await cli(url, "logs", "--id", "live") == "first\nsecond\n"
        assert await service.stop(signal.SIGTERM) == 0
    assert bytes(seen) == b"first\nsecond\n"
    assert f"run {run_id} failed (exit 4)".encode() in errors
    assert task["last_run"]["exit_code"] == 4
    # Once the run ended its live output only lingers for late followers, then expires
    # (reading the ended run did not renew it).
    assert 0 < await servers.ttl(f"{prefix}output:{run_id}") <= 60


async def test_logs_follow_outlasts_a_quiet_run(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    """Keep-alives come while the run prints nothing (every 0.2 s here, 10 s by default):
    ``logs --follow`` reads past them to the end."""
    go_on = tmp_path / "go-on"
    script = f"echo start; while [ ! -e {go_on} ]; do sleep 0.05; done; echo done"
    env = service_env(prefix, TASKQ_KEEPALIVE_SECONDS="0.2")
    async with running(["serve"], env) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(url, "create", "--id", "quiet", "--name", "quiet", "--command", script)
        await cli(url, "execute", "--id", "quiet")
        follower = await anyio.open_process(
            [*taskq_command(), "logs", "--id", "quiet", "--follow"],
            env={**os.environ, "TASKQ_API_URL": url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        async with follower:
            assert follower.stdout is not None and follower.stderr is not None
            seen = bytearray()
            await read_until(follower.stdout, seen, b"start\n")
            await anyio.sleep(1.5)  # quiet for several keep-alive intervals
            go_on.touch()
            with anyio.fail_after(WAIT):
                async for chunk in follower.stdout:
                    seen += chunk
                errors = b"".join([chunk async for chunk in follower.stderr])
                code = await follower.wait()
        assert await service.stop(signal.SIGTERM) == 0
    assert (code, bytes(seen)) == (0, b"start\ndone\n"), errors.decode()


async def follow_events(http: httpx.AsyncClient, path: str, first: anyio.Event) -> list[str]:
    """The events of a followed output stream, as ``event:data`` strings."""
    events: list[str] = []
    async with http.stream("GET", path, params={"follow": "true"}) as response:
        assert response.status_code == 200
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event:
                data = json.loads(line.removeprefix("data: "))
                events.append(f"{event}:{data['text'] if event == 'output' else data['status']}")
                first.set()
    return events


async def test_forty_followers_share_one_redis_read_and_one_more_is_told_to_retry(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    go_on = tmp_path / "go-on"
    script = f"echo first; while [ ! -e {go_on} ]; do sleep 0.05; done; echo last"
    followers = 40
    env = service_env(prefix, TASKQ_MAX_FOLLOWERS=str(followers))
    async with running(["serve"], env) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(url, "create", "--id", "many", "--name", "many", "--command", script)
        run_id = json.loads(await cli(url, "execute", "--id", "many", "--json"))["run_id"]
        path = f"/tasks/many/runs/{run_id}/output"
        limits = httpx.Limits(max_connections=followers + 5)
        received: list[list[str]] = []
        reading: list[dict[str, str]] = []
        refused: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=WAIT) as http:
            await wait_for_task(http, "many", {"running"})

            async def follower(started: anyio.Event) -> None:
                received.append(await follow_events(http, path, started))

            with anyio.fail_after(WAIT * 2):
                async with anyio.create_task_group() as tg:
                    started = [anyio.Event() for _ in range(followers)]
                    for event in started:
                        tg.start_soon(follower, event)
                    for event in started:
                        await event.wait()
                    # Every follower has its first line and waits for more.
                    clients = await servers.client_list()  # pyright: ignore[reportUnknownMemberType]
                    name = f"taskq-{service.process.pid}"
                    reading += [c for c in clients if c["name"] == name and c["cmd"] == "xread"]
                    refused.append(await http.get(path, params={"follow": "true"}))
                    go_on.touch()
        assert await service.stop(signal.SIGTERM) == 0
    print(f"{followers} followers: {len(reading)} connection(s) of the API process in XREAD")
    assert len(reading) <= 2, reading
    assert refused[0].status_code == 503 and refused[0].headers["retry-after"].isdigit()
    assert received == [["output:first\n", "output:last\n", "end:completed"]] * followers

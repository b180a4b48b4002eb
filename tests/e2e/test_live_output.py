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

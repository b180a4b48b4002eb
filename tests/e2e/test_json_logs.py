"""``TASKQ_LOG_FORMAT=json``: every line a real ``taskq serve`` writes to stderr, its
consumer processes' included, is one JSON object, and a run's lines name it."""

from __future__ import annotations

import json
import signal
from datetime import datetime
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import (
    ServiceProcess,
    cli,
    running,
    service_env,
    taskq_command,
    wait_for_task,
)

pytestmark = pytest.mark.e2e


def parsed(service: ServiceProcess) -> list[dict[str, Any]]:
    """Every line of the service's log, each of which must be one JSON object."""
    lines: list[dict[str, Any]] = []
    for line in service.log:
        if line:
            record = json.loads(line)
            assert isinstance(record, dict), line
            lines.append(record)  # pyright: ignore[reportUnknownArgumentType]
    return lines


def lines_about(service: ServiceProcess, run_id: str) -> list[dict[str, Any]]:
    return [line for line in parsed(service) if run_id in line["message"]]


async def test_every_line_is_json_and_a_runs_lines_carry_its_ids(
    prefix: str, servers: redis.Redis
) -> None:
    # Two consumer processes: they get the format from their parent's settings.
    env = service_env(prefix, TASKQ_LOG_FORMAT="json", TASKQ_PROCESSES="2")
    async with running(["serve"], env) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(url, "create", "--id", "nowhere", "--name", "n", "--command", "true",
                  "--cwd", "/nonexistent/taskq-test")  # fmt: skip
        await cli(url, "create", "--id", "slow", "--name", "s", "--command", "sleep 30",
                  "--timeout", "0.5")  # fmt: skip
        runs: dict[str, str] = {}
        async with httpx.AsyncClient(base_url=url) as http:
            for task_id in ("nowhere", "slow"):
                runs[task_id] = json.loads(await cli(url, "execute", "--id", task_id, "--json"))[
                    "run_id"
                ]
                await wait_for_task(http, task_id, {"failed"})

        for task_id, run_id in runs.items():
            await eventually(lambda run_id=run_id: bool(lines_about(service, run_id)), within=5)
            for line in lines_about(service, run_id):
                assert (line["task_id"], line["run_id"]) == (task_id, run_id), line
        [not_started] = lines_about(service, runs["nowhere"])
        assert "not_started" in not_started["message"]
        assert "/nonexistent/taskq-test" in not_started["message"]
        [timed_out] = lines_about(service, runs["slow"])
        assert "timed_out" in timed_out["message"]
        assert await service.stop(signal.SIGTERM) == 0

    records = parsed(service)
    messages = [line["message"] for line in records]
    assert any(m.startswith("taskq ready: ") for m in messages) and "taskq stopped" in messages
    assert len({line["process"] for line in records}) == 3  # the parent and its consumers
    for line in records:
        assert set(line) >= {"time", "level", "logger", "message"}
        assert datetime.fromisoformat(line["time"]).utcoffset() is not None
        assert line["time"].endswith("Z")


async def test_a_failed_start_is_logged_as_json_too(prefix: str) -> None:
    env = service_env(prefix, TASKQ_LOG_FORMAT="json", REDIS_URL="redis://127.0.0.1:1/0")
    with anyio.fail_after(30):
        result = await anyio.run_process([*taskq_command(), "serve"], env=env, check=False)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.decode().splitlines()]
    assert lines[-1]["level"] == "ERROR"
    assert lines[-1]["message"].startswith("taskq stopped: ")
    assert "127.0.0.1:1" in lines[-1]["message"] or "Connect" in lines[-1]["message"]


async def test_an_unknown_log_format_is_refused_at_start(prefix: str) -> None:
    env = service_env(prefix, TASKQ_LOG_FORMAT="yaml")
    with anyio.fail_after(20):
        result = await anyio.run_process([*taskq_command(), "serve"], env=env, check=False)
    assert result.returncode != 0
    assert "TASKQ_LOG_FORMAT must be one of text, json, got 'yaml'" in result.stderr.decode()

"""Upcoming fires through the real service (Redis, RabbitMQ) and the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis.asyncio as redis

from tests.e2e.harness import cli, running, service_env, wait_for_task

pytestmark = pytest.mark.e2e


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def test_upcoming_lists_idle_and_running_tasks_fires_in_time_order(
    prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=10)
        for task_id, command in (("hourly", "true"), ("busy", "sleep 30"), ("once", "true")):
            await cli(url, "create", "--id", task_id, "--name", task_id, "--command", command)
        await cli(url, "schedule", "--id", "hourly", "--every", "3600", "--start", iso(start))
        await cli(url, "schedule", "--id", "once", "--at", iso(start + timedelta(minutes=30)))
        await cli(url, "schedule", "--id", "busy", "--every", "1800", "--start", iso(start))
        # Running, its entry in scheduled_tasks is its run's lease: still listed by its fires.
        await cli(url, "execute", "--id", "busy")
        async with httpx.AsyncClient(base_url=url) as http:
            await wait_for_task(http, "busy", {"running"})

        window = ["--from", iso(start), "--to", iso(start + timedelta(hours=2))]
        fires = json.loads(await cli(url, "upcoming", *window, "--json"))
        assert [(f["due_at"], f["task_id"]) for f in fires] == [
            (iso(start), "busy"),
            (iso(start), "hourly"),
            (iso(start + timedelta(minutes=30)), "busy"),
            (iso(start + timedelta(minutes=30)), "once"),
            (iso(start + timedelta(minutes=60)), "busy"),
            (iso(start + timedelta(minutes=60)), "hourly"),
            (iso(start + timedelta(minutes=90)), "busy"),
        ]
        assert [f["recurring"] for f in fires] == [True, True, True, False, True, True, True]

        table = await cli(url, "upcoming", *window, "--limit", "3")
        lines = table.splitlines()
        assert lines[0].split() == ["DUE", "(UTC)", "TASK", "NAME", "RECURRING"]
        assert [line.split()[2] for line in lines[1:]] == ["busy", "hourly", "busy"]
        assert lines[3].split()[-1] == "yes"

        refused = await cli(url, "upcoming", "--from", "tomorrow", expect_code=1)
        assert "`from` must be an RFC 3339 time" in refused

"""Recurring schedules through the real processes and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import cli, running, service_env, wait_for_task

pytestmark = pytest.mark.e2e


async def finished_runs(http: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    runs = (await http.get(f"/tasks/{task_id}/runs", params={"limit": 100})).json()
    return [r for r in reversed(runs) if r["status"] in ("completed", "failed")]


@asynccontextmanager
async def scheduler_outage(
    env: dict[str, str], http: httpx.AsyncClient, task_id: str, *, runs_first: int
) -> AsyncIterator[tuple[int, datetime, datetime]]:
    """Schedule ``task_id`` every second with a scheduler running until it has
    ``runs_first`` finished runs, stop that scheduler for 3.5 s (three or four fire
    times pass unserved), then run a fresh one for the block. Yields the number of
    finished runs before the outage, when the fresh scheduler was launched and when it was
    ready (it may fire a little before the test sees it ready)."""
    async with running(["serve", "--roles", "scheduler"], env, name="scheduler") as first:
        await cli(str(http.base_url), "schedule", "--id", task_id, "--every", "1")

        async def enough_runs() -> bool:
            return len(await finished_runs(http, task_id)) >= runs_first

        await eventually(enough_runs, within=10, every=0.1)
        assert await first.stop(signal.SIGTERM) == 0
    # A run dispatched just before the stop may still be finishing.
    await wait_for_task(http, task_id, {"completed", "failed"})
    before_outage = len(await finished_runs(http, task_id))
    await anyio.sleep(3.5)
    assert len(await finished_runs(http, task_id)) == before_outage
    launched = datetime.now(UTC)
    async with running(["serve", "--roles", "scheduler"], env, name="scheduler"):
        yield before_outage, launched, datetime.now(UTC)


async def test_a_seconds_cron_fires_on_each_second_until_unscheduled(
    prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(url, "create", "--id", "tick", "--name", "tick", "--command", "date +%s.%N")
        scheduled = json.loads(
            await cli(url, "schedule", "--id", "tick", "--cron", "* * * * * *", "--json")
        )
        assert scheduled["schedule"]["cron"] == "* * * * * *"
        assert len(scheduled["next_runs"]) == 5
        shown = await cli(url, "get", "--id", "tick")
        assert "in words:     Every second (UTC)" in shown.splitlines()
        async with httpx.AsyncClient(base_url=url) as http:

            async def three_runs() -> bool:
                return len(await finished_runs(http, "tick")) >= 3

            await eventually(three_runs, within=10, every=0.1)
            await cli(url, "unschedule", "--id", "tick")
            runs = await finished_runs(http, "tick")
            # Whatever was already queued finishes; then nothing more fires.
            await anyio.sleep(2.5)
            after = await finished_runs(http, "tick")
        assert await service.stop(signal.SIGTERM) == 0

    starts = [datetime.fromisoformat(r["started_at"]) for r in runs]
    print("cron * * * * * * started at", [s.strftime("%S.%f")[:-3] for s in starts])
    assert all(r["status"] == "completed" for r in runs)
    for start in starts:
        # Each run starts just after a whole second (its fire time), never before it.
        assert start.microsecond < 500_000
    assert all(b - a >= timedelta(milliseconds=500) for a, b in itertools.pairwise(starts))
    assert len(after) <= len(runs) + 1, "runs went on after unschedule"


async def test_every_runs_at_its_interval_and_missed_fires_coalesce(
    prefix: str, servers: redis.Redis
) -> None:
    env = service_env(prefix)
    async with running(["serve", "--roles", "api,consumer"], env, name="api") as api:
        assert api.api_url is not None
        url = api.api_url
        await cli(url, "create", "--id", "beat", "--name", "beat", "--command", "true")
        async with (
            httpx.AsyncClient(base_url=url) as http,
            scheduler_outage(env, http, "beat", runs_first=2) as outage,
        ):
            before_outage, launched, restarted = outage

            async def one_more() -> bool:
                return len(await finished_runs(http, "beat")) > before_outage

            await eventually(one_more, within=10, every=0.05)
            await anyio.sleep(2.5)
            runs = await finished_runs(http, "beat")
            observed_until = datetime.now(UTC)
    started = [datetime.fromisoformat(r["started_at"]) for r in runs[before_outage:]]
    # Fires are whole seconds apart, so at most ceil(span) of them fall in the span from
    # the fresh scheduler's launch to now. Coalesced, the three or more fires missed in the
    # outage add one catch-up run to those; run one each, they would add three or more.
    span = (observed_until - launched).total_seconds()
    regular_fires = math.ceil(span)
    print(
        f"every 1 s: {before_outage} runs before a 3.5 s scheduler outage; "
        f"{len(started)} in the {span:.1f} s after it ({regular_fires} fire times at most)"
    )
    assert 1 <= len(started) <= regular_fires + 1
    assert started[0] - restarted < timedelta(seconds=1)


async def test_pause_holds_the_schedule_and_resume_picks_it_up(prefix: str) -> None:
    async with running(["dev", "--port", "0"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        await cli(url, "create", "--id", "p", "--name", "p", "--command", "true")
        await cli(url, "schedule", "--id", "p", "--every", "1")
        async with httpx.AsyncClient(base_url=url) as http:

            async def runs_at_least(count: int) -> bool:
                return len(await finished_runs(http, "p")) >= count

            await eventually(lambda: runs_at_least(1), within=10, every=0.05)
            paused = json.loads(await cli(url, "pause", "--id", "p", "--json"))
            assert paused["paused"] is True
            at_pause = len(await finished_runs(http, "p"))
            await anyio.sleep(2.5)  # two or three fire times pass while paused
            during = len(await finished_runs(http, "p"))
            resumed = json.loads(await cli(url, "resume", "--id", "p", "--json"))
            assert resumed["paused"] is False
            await eventually(lambda: runs_at_least(during + 1), within=5, every=0.05)
    # A run queued just before the pause may still finish; no fire happens while paused.
    assert during <= at_pause + 1


async def test_misfires_beyond_the_grace_time_are_skipped_and_recorded(
    prefix: str, servers: redis.Redis
) -> None:
    env = service_env(prefix)
    async with running(["serve", "--roles", "api,consumer"], env, name="api") as api:
        assert api.api_url is not None
        url = api.api_url
        await cli(
            url,
            *("create", "--id", "strict", "--name", "strict", "--command", "true"),
            *("--misfire", "skip", "--misfire-grace", "1.5"),
        )
        async with (
            httpx.AsyncClient(base_url=url) as http,
            scheduler_outage(env, http, "strict", runs_first=1) as (_, _, restarted),
        ):

            async def skipped_then_ran() -> bool:
                # Newest first; the newest may be a fire queued ahead of its due time.
                runs = (await http.get("/tasks/strict/runs")).json()
                skips = [n for n, r in enumerate(runs) if r["status"] == "skipped"]
                later = runs[: skips[0]] if skips else []
                return any(r["status"] in ("completed", "failed") for r in later)

            await eventually(skipped_then_ran, within=10, every=0.05)
            runs = (await http.get("/tasks/strict/runs")).json()
            shown = await cli(url, "runs", "--id", "strict")
    skipped = [r for r in runs if r["status"] == "skipped"]
    print("misfire skip after a 3.5 s scheduler outage:", [r["error"] for r in skipped])
    assert len(skipped) == 1, "one record stands for all the fires missed in one outage"
    assert "misfire" in skipped[0]["error"] and skipped[0]["started_at"] is None
    assert datetime.fromisoformat(skipped[0]["queued_at"]) < restarted - timedelta(seconds=2)
    assert "skipped" in shown and "misfire: the fire due at" in shown
    # The next run is the next regular fire after the restart, not a catch-up. (Runs are
    # newest first; the newest may be the fire after it, queued ahead of its due time.)
    after_skip = runs[: runs.index(skipped[0])]
    ran = [r for r in after_skip if r["status"] in ("completed", "failed")]
    resumed = datetime.fromisoformat(ran[-1]["started_at"])
    assert resumed > datetime.fromisoformat(skipped[0]["finished_at"])
    assert resumed - restarted < timedelta(seconds=2)


@pytest.mark.parametrize("overlap", ["queue", "forbid"])
async def test_a_fire_during_a_run_follows_the_overlap_policy(
    prefix: str, servers: redis.Redis, overlap: str
) -> None:
    async with running(["serve"], service_env(prefix)) as service:
        assert service.api_url is not None
        url = service.api_url
        # Runs take 1.5 s and fire every second: every run overlaps the next fire.
        await cli(
            url,
            *("create", "--id", "slow", "--name", "slow", "--command", "sleep 1.5"),
            *("--overlap", overlap),
        )
        await cli(url, "schedule", "--id", "slow", "--every", "1")
        async with httpx.AsyncClient(base_url=url) as http:

            async def two_runs() -> bool:
                return len(await finished_runs(http, "slow")) >= 2

            await eventually(two_runs, within=15, every=0.1)
            await cli(url, "unschedule", "--id", "slow")
            history = list(reversed((await http.get("/tasks/slow/runs")).json()))
        assert await service.stop(signal.SIGTERM) == 0
    # The fire dispatched ahead of its due time when ``unschedule`` came is withdrawn
    # (recorded skipped, see look-ahead dispatch): it is not an overlap.
    history = [r for r in history if "withdrawn before its due time" not in (r["error"] or "")]
    ran = [r for r in history if r["status"] == "completed"]
    skipped = [r for r in history if r["status"] == "skipped"]
    print(f"overlap {overlap}: {[r['status'] for r in history]}")
    for previous, following in itertools.pairwise(ran):
        # Never two runs of one task at once.
        assert following["started_at"] >= previous["finished_at"]
    if overlap == "queue":
        assert skipped == []
        # The fire that came during a run starts as soon as that run ends.
        gap = datetime.fromisoformat(ran[1]["started_at"]) - datetime.fromisoformat(
            ran[0]["finished_at"]
        )
        assert gap < timedelta(seconds=0.5)
    else:
        assert skipped, "a fire during a run must leave a skipped run"
        assert all("overlap" in r["error"] for r in skipped)
        assert history[1]["status"] == "skipped"
        assert history[1]["error"].endswith(f"{ran[0]['run_id']} had not ended")

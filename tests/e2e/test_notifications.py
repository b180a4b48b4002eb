"""Notifications through the real ``taskq serve`` (Redis and RabbitMQ): webhooks that a
receiver started by the test gets, signed, once per event, at least once whatever
fails, and never in a run's way."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import cli, running, service_env, wait_for_task
from tests.webhook_receiver import SECRET, Receiver, receiving

pytestmark = pytest.mark.e2e

PUBLIC_URL = "https://taskq.example"


def notify_env(prefix: str, **extra: str) -> dict[str, str]:
    return service_env(
        prefix,
        TASKQ_WEBHOOK_SECRET=SECRET,
        TASKQ_PUBLIC_URL=PUBLIC_URL,
        TASKQ_NOTIFY_BACKOFF="0.2",
        **extra,
    )


@asynccontextmanager
async def notifying(prefix: str, **env: str) -> AsyncIterator[tuple[Receiver, httpx.AsyncClient]]:
    """A receiver, and a client of a ``taskq serve`` that signs what it sends it."""
    async with receiving() as receiver, running(["serve"], notify_env(prefix, **env)) as service:
        assert service.api_url is not None
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            yield receiver, http


async def records_of(http: httpx.AsyncClient, task_id: str) -> dict[str, dict[str, Any]]:
    """The notifications of the task's newest run, by event."""
    [run, *_] = (await http.get(f"/tasks/{task_id}/runs")).json()
    return {record["event"]: record for record in run["notifications"]}


async def settled(http: httpx.AsyncClient, task_id: str, events: set[str]) -> None:
    async def done() -> bool:
        records = await records_of(http, task_id)
        return all(
            records.get(event, {}).get("state") in ("delivered", "failed") for event in events
        )

    await eventually(done, within=20, every=0.1)


async def test_each_hook_comes_once_signed_also_after_two_server_errors(
    prefix: str, servers: redis.Redis
) -> None:
    async with notifying(prefix) as (receiver, http):
        notify = {
            "on_start": receiver.to("ok/start"),
            "on_success": receiver.to("flaky/success"),
            "on_failure": receiver.to("ok/failure"),
            "success_ping": receiver.to("ok/ping"),
        }
        body = {"id": "job", "name": "Nightly job", "command": "echo hi", "notify": notify}
        assert (await http.post("/tasks", json=body)).status_code == 201
        await http.post("/tasks/job/execute")
        await wait_for_task(http, "job", {"completed"})
        await settled(http, "job", {"on_start", "on_success", "success_ping"})
        [run] = (await http.get("/tasks/job/runs")).json()
        shown = (await http.get(f"/tasks/job/runs/{run['run_id']}")).json()
    records = {record["event"]: record for record in run["notifications"]}
    assert shown["notifications"] == run["notifications"]
    assert {event: (r["state"], r["attempts"]) for event, r in records.items()} == {
        "on_start": ("delivered", 1),
        "on_success": ("delivered", 3),
        "success_ping": ("delivered", 1),
    }
    assert records["on_success"]["last_error"] == "HTTP 500"
    assert records["on_success"]["delivered_at"] is not None
    # Nothing is left to send: no hook comes again.
    assert await servers.zcard(f"{prefix}notify_due") == 0

    [start] = receiver.at("ok/start")
    assert start.method == "POST" and start.signed
    assert start.json["event"] == "on_start" and start.json["run"]["outcome"] is None
    tries = receiver.at("flaky/success")
    assert len(tries) == 3 and all(hook.signed for hook in tries)
    assert {hook.headers["x-taskq-delivery"] for hook in tries} == {
        f"job/{run['run_id']}/on_success"
    }
    success = tries[-1].json
    assert success["event"] == "on_success"
    assert success["task"] == {"id": "job", "name": "Nightly job"}
    assert success["run"]["id"] == run["run_id"]
    assert success["run"]["attempt"] == 1
    assert (success["run"]["outcome"], success["run"]["exit_code"]) == ("completed", 0)
    assert success["run"]["duration"] == run["duration"]
    assert success["run"]["url"] == f"{PUBLIC_URL}/tasks/job/runs/{run['run_id']}"
    assert datetime.fromisoformat(success["run"]["finished_at"]) == datetime.fromisoformat(
        run["finished_at"]
    )
    [ping] = receiver.at("ok/ping")
    assert (ping.method, ping.body) == ("GET", b"")
    assert receiver.at("ok/failure") == []


async def test_failure_is_notified_once_after_the_last_attempt(prefix: str) -> None:
    async with notifying(prefix) as (receiver, http):
        notify = {"on_failure": receiver.to("ok/failure"), "on_success": receiver.to("ok/s")}
        body = {
            "id": "flaky",
            "name": "flaky",
            "command": "exit 3",
            "max_attempts": 2,
            "retry_backoff": 0.1,
            "notify": notify,
        }
        await http.post("/tasks", json=body)
        await http.post("/tasks/flaky/execute")
        await wait_for_task(http, "flaky", {"failed"})
        await settled(http, "flaky", {"on_failure"})
        first, last = reversed((await http.get("/tasks/flaky/runs")).json())
    assert first["notifications"] == []  # retried: not a failure of the task yet
    [failure] = receiver.at("ok/failure")
    assert failure.signed
    assert failure.json["run"]["id"] == last["run_id"]
    assert (failure.json["run"]["attempt"], failure.json["run"]["outcome"]) == (2, "failed")
    assert failure.json["run"]["exit_code"] == 3
    assert receiver.at("ok/s") == []


async def test_a_receiver_that_never_answers_does_not_delay_the_next_runs(prefix: str) -> None:
    env = {"TASKQ_NOTIFY_TIMEOUT": "30", "TASKQ_NOTIFY_CONCURRENCY": "1"}
    async with notifying(prefix, **env) as (receiver, http):
        notify = {"on_start": receiver.to("hang/start"), "on_success": receiver.to("hang/ok")}
        body = {"id": "tick", "name": "tick", "command": "true", "notify": notify}
        await http.post("/tasks", json=body)
        await http.post("/tasks/tick/schedule", json={"every": 1})

        async def four_runs() -> bool:
            runs = (await http.get("/tasks/tick/runs")).json()
            return sum(run["status"] == "completed" for run in runs) >= 4

        await eventually(four_runs, within=15, every=0.1)
        task = (await http.get("/tasks/tick")).json()
        runs = (await http.get("/tasks/tick/runs")).json()
    # The one notifier slot hangs on the first hook for 30 s: the runs go on regardless.
    assert len(receiver.at("hang/start")) == 1
    start = datetime.fromisoformat(task["schedule"]["start"])
    lateness = []
    for run in runs:
        if run["status"] == "completed":
            since = (datetime.fromisoformat(run["started_at"]) - start).total_seconds()
            lateness.append(since - round(since))
    print(f"lateness of {len(lateness)} runs: {[f'{s:.3f}' for s in lateness]}")
    assert all(-0.05 < late < 0.5 for late in lateness)
    assert all(r["state"] == "pending" for run in runs for r in run["notifications"])


async def test_a_delivery_cut_short_by_a_killed_notifier_is_sent_again(
    prefix: str,
) -> None:
    env = notify_env(prefix, TASKQ_LEASE_SECONDS="1", TASKQ_NOTIFY_TIMEOUT="3")
    async with receiving() as receiver:
        async with running(["serve"], env, name="first") as first:
            assert first.api_url is not None
            async with httpx.AsyncClient(base_url=first.api_url) as http:
                notify = {"on_success": receiver.to("hold/success")}
                await http.post(
                    "/tasks", json={"id": "j", "name": "j", "command": "true", "notify": notify}
                )
                await http.post("/tasks/j/execute")
                await eventually(lambda: len(receiver.at("hold/success")) == 1, within=20)
            first.process.send_signal(signal.SIGKILL)  # mid-delivery: no answer came yet
            await first.process.wait()
        async with running(["serve"], env, name="second") as second:
            assert second.api_url is not None
            async with httpx.AsyncClient(base_url=second.api_url) as http:
                await settled(http, "j", {"on_success"})
                records = await records_of(http, "j")
    cut, again = receiver.at("hold/success")
    assert cut.headers["x-taskq-delivery"] == again.headers["x-taskq-delivery"]
    assert again.signed
    assert (records["on_success"]["state"], records["on_success"]["attempts"]) == ("delivered", 1)


async def test_still_running_comes_once_for_a_long_run_and_not_for_a_short_one(
    prefix: str, servers: redis.Redis
) -> None:
    async with notifying(prefix) as (receiver, http):
        for task_id, command in (("long", "sleep 3"), ("short", "true")):
            still = {"url": receiver.to(f"ok/{task_id}"), "after": 1}
            body = {
                "id": task_id,
                "name": task_id,
                "command": command,
                "notify": {"on_still_running": still},
            }
            await http.post("/tasks", json=body)
            await http.post(f"/tasks/{task_id}/execute")
        await wait_for_task(http, "long", {"completed"})
        await wait_for_task(http, "short", {"completed"})

        async def outbox_empty() -> bool:
            return await servers.zcard(f"{prefix}notify_due") == 0

        await eventually(outbox_empty, within=10, every=0.1)
        long_records = await records_of(http, "long")
        short_records = await records_of(http, "short")
    [still] = receiver.at("ok/long")
    assert still.signed and still.json["event"] == "on_still_running"
    assert still.json["run"]["outcome"] is None  # it was still running
    assert (
        long_records["on_still_running"]["state"],
        long_records["on_still_running"]["attempts"],
    ) == (
        "delivered",
        1,
    )
    assert receiver.at("ok/short") == []
    assert short_records == {}  # dropped unsent: the run had ended


async def test_the_cli_sets_notifications_and_shows_their_delivery(prefix: str) -> None:
    env = service_env(prefix)  # no TASKQ_WEBHOOK_SECRET: unsigned, with a warning
    async with receiving() as receiver, running(["dev", "--port", "0"], env) as service:
        api = service.api_url
        assert api is not None
        created = await cli(
            api,
            *("create", "--id", "c", "--name", "c", "--command", "true", "--json"),
            *("--on-success", receiver.to("ok/success")),
            *("--on-still-running", receiver.to("ok/slow"), "--still-running-after", "60"),
        )
        still = {"url": receiver.to("ok/slow"), "after": 60}
        assert json.loads(created)["notify"] == {
            "on_success": receiver.to("ok/success"),
            "on_still_running": still,
        }
        updated = await cli(
            api, "update", "--id", "c", "--on-failure", receiver.to("ok/failure"), "--json"
        )
        assert json.loads(updated)["notify"] == {
            "on_success": receiver.to("ok/success"),
            "on_failure": receiver.to("ok/failure"),
            "on_still_running": still,
        }
        shown = await cli(api, "get", "--id", "c")
        assert f"on_still_running {receiver.to('ok/slow')} after 60 s" in shown
        refused = await cli(
            api, "create", "--id", "d", "--name", "d", "--command", "true",
            "--on-still-running", receiver.to("ok/slow"), expect_code=2,
        )  # fmt: skip
        assert "--still-running-after" in refused

        await cli(api, "execute", "--id", "c")
        async with httpx.AsyncClient(base_url=api) as http:
            await wait_for_task(http, "c", {"completed"})
            await settled(http, "c", {"on_success"})
            [run] = (await http.get("/tasks/c/runs")).json()
        details = await cli(api, "runs", "--id", "c", "--run", run["run_id"])
        assert f"on_success to {receiver.to('ok/success')}: delivered (1 attempt)" in details
        cleared = await cli(api, "update", "--id", "c", "--no-notify", "--json")
        assert json.loads(cleared)["notify"] is None
    [hook] = receiver.at("ok/success")
    assert "x-taskq-signature" not in hook.headers
    assert any("TASKQ_WEBHOOK_SECRET is not set" in line for line in service.log)

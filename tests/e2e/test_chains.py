"""Chained tasks end to end: real processes, a consumer SIGKILLed mid-chain, every target
triggered exactly once; and a chain made and shown through the CLI."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.harness import cli, running, service_env, wait_for_task

pytestmark = pytest.mark.e2e

LEASE_SECONDS = 2.0


async def runs_of(http: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"/tasks/{task_id}/runs")
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_chain_under_a_killed_consumer_triggers_each_target_exactly_once(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    """A -> B -> C on success, A -> D on failure. A fails once and succeeds on its retry
    (so D never runs); the consumer running B is SIGKILLed; a new consumer takes over:
    B's lost run is run again, C is triggered once, nothing is triggered twice."""
    env = service_env(prefix, TASKQ_LEASE_SECONDS=str(LEASE_SECONDS))
    a_failed = tmp_path / "a-failed-once"
    b_pid = tmp_path / "b-first-attempt-pid"
    tasks = [
        {"id": "c", "name": "C", "command": "echo c"},
        {"id": "d", "name": "D", "command": "echo d"},
        # B's first attempt never ends by itself (its consumer is killed meanwhile).
        {
            "id": "b",
            "name": "B",
            "command": f"if [ -e {b_pid} ]; then echo b; else echo $$ > {b_pid}; sleep 600; fi",
            "chain": {"on_success": ["c"]},
        },
        {
            "id": "a",
            "name": "A",
            "command": f"if [ -e {a_failed} ]; then echo a; else touch {a_failed}; exit 3; fi",
            "max_attempts": 2,
            "retry_backoff": 0.2,
            "chain": {"on_success": ["b"], "on_failure": ["d"]},
        },
    ]
    async with running(["serve", "--roles", "api,scheduler"], env, name="api") as api:
        assert api.api_url is not None
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            for task in tasks:
                created = await http.post("/tasks", json=task)
                assert created.status_code == 201, created.text
            try:
                async with running(["serve", "--roles", "consumer"], env, name="doomed") as doomed:
                    assert (await http.post("/tasks/a/execute")).status_code == 202
                    await eventually(
                        lambda: b_pid.exists() and b_pid.read_text().strip() != "", within=30
                    )
                    doomed.process.kill()
                    await doomed.process.wait()
                async with running(["serve", "--roles", "consumer"], env, name="rescuer"):
                    await wait_for_task(http, "c", {"completed", "failed"}, within=40)
                    # Long enough for any trigger sent twice to show up.
                    await wait_for_task(http, "b", {"completed"}, within=3 * LEASE_SECONDS)
                    runs = {t: await runs_of(http, t) for t in ("a", "b", "c", "d")}
            finally:
                with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
                    os.killpg(int(b_pid.read_text()), signal.SIGKILL)

    a_retry, a_first = runs["a"]
    assert (a_first["status"], a_first["attempt"], a_first["triggered"]) == ("failed", 1, [])
    assert (a_retry["status"], a_retry["attempt"]) == ("completed", 2)
    assert runs["d"] == [], "A succeeded on its retry: its on_failure target must not run"

    # Each attempt of B carries its trigger; one trigger, so one first attempt.
    assert {r["attempt"] for r in runs["b"]} == {1, 2}, runs["b"]
    triggered_b = [r for r in runs["b"] if r["attempt"] == 1]
    assert len(triggered_b) == 1, runs["b"]
    assert all(r["triggered_by"] == triggered_b[0]["triggered_by"] for r in runs["b"])
    assert triggered_b[0]["triggered_by"] == {
        "task_id": "a",
        "run_id": a_retry["run_id"],
        "hops": 1,
    }
    assert a_retry["triggered"] == [
        {"task_id": "b", "outcome": "queued", "run_id": triggered_b[0]["run_id"]}
    ]
    b_done = [r for r in runs["b"] if r["status"] == "completed"]
    b_lost = [r for r in runs["b"] if r["status"] == "failed"]
    assert len(b_done) == 1 and len(b_lost) == 1, runs["b"]
    assert b_lost[0]["error"].startswith("lost:")

    [c_run] = runs["c"]
    assert c_run["status"] == "completed"
    assert c_run["triggered_by"] == {"task_id": "b", "run_id": b_done[0]["run_id"], "hops": 2}
    assert b_done[0]["triggered"] == [
        {"task_id": "c", "outcome": "queued", "run_id": c_run["run_id"]}
    ]
    print(f"runs: A {len(runs['a'])}, B {len(runs['b'])}, C {len(runs['c'])}, D 0")


async def test_a_chain_made_and_shown_through_the_cli(prefix: str) -> None:
    env = service_env(prefix, REDIS_URL="redis://127.0.0.1:1/0", AMQP_URL="amqp://127.0.0.1:1/")
    async with running(["dev", "--port", "0"], env) as service:
        url = service.api_url
        assert url is not None
        async with httpx.AsyncClient(base_url=url) as http:
            for task_id in ("b", "d"):
                body = {"id": task_id, "name": task_id, "command": "true"}
                assert (await http.post("/tasks", json=body)).status_code == 201
            shown = await cli(
                url,
                "create",
                "--id", "a",
                "--name", "a",
                "--command", "true",
                "--chain-success", "b",
                "--chain-failure", "d",
                "--chain-failure", "b",
            )  # fmt: skip
            assert "chain:        on success: b; on failure: d, b" in shown
            refused = await cli(url, "update", "--id", "b", "--chain-success", "a", expect_code=1)
            assert "b -> a -> b" in refused
            await cli(url, "update", "--id", "a", "--chain-failure", "d")
            assert "chain:        on success: b; on failure: d\n" in await cli(
                url, "get", "--id", "a"
            )

            run = (await http.post("/tasks/a/execute")).json()
            await wait_for_task(http, "b", {"completed"})
        shown_run = await cli(url, "runs", "--id", "a", "--run", run["run_id"])
        assert "chain: b queued (run " in shown_run
        assert "chain: by a" in await cli(url, "runs", "--id", "b")

"""Promises kept when processes die: real processes, really killed."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncGenerator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiormq
import anyio
import httpx
import pytest
import redis.asyncio as redis
from aiormq.abc import AbstractChannel
from pamqp import commands as spec

from app.adapters.amqp_broker import ROUTING_KEY, AmqpLayout
from app.domain import DEAD_LETTER_LIMIT, DEAD_LETTERED_REASON
from app.ports import DELIVERY_LIMIT
from tests.conftest import AMQP_URL, eventually
from tests.e2e.harness import running, service_env, wait_for_task

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 20


async def test_a_run_lost_with_its_killed_consumer_is_run_again_elsewhere(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    lease = 2.0
    env = service_env(prefix, TASKQ_LEASE_SECONDS=str(lease))
    marker = tmp_path / "first-attempt-pid"
    # The first attempt never ends by itself; the second one does.
    command = f"if [ -e {marker} ]; then echo second; else echo $$ > {marker}; sleep 600; fi"
    async with running(["serve", "--roles", "api,scheduler"], env, name="api") as api:
        assert api.api_url is not None
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            await http.post("/tasks", json={"id": "victim", "name": "v", "command": command})
            async with running(["serve", "--roles", "consumer"], env, name="doomed") as doomed:
                first = (await http.post("/tasks/victim/execute")).json()
                await eventually(lambda: marker.exists() and marker.read_text().strip() != "")
                doomed.process.kill()
                killed_at = anyio.current_time()
                await doomed.process.wait()
            try:
                async with running(["serve", "--roles", "consumer"], env, name="rescuer"):
                    task = await wait_for_task(http, "victim", {"completed", "failed"}, within=30)
                    recovered_after = anyio.current_time() - killed_at
                runs = (await http.get("/tasks/victim/runs", params={"output": "true"})).json()
            finally:
                # The dead consumer's watchdog stops its command's group; this only makes
                # sure nothing is left behind if that ever failed (test_process_safety checks it).
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.killpg(int(marker.read_text()), signal.SIGKILL)

    print(
        f"consumer killed mid-run; recovered after {recovered_after:.1f} s "
        f"(lease {lease:g} s); runs: {[(r['attempt'], r['status'], r['worker']) for r in runs]}"
    )
    assert task["status"] == "completed"
    second, lost = runs
    assert lost["run_id"] == first["run_id"]
    assert lost["status"] == "failed" and lost["error"].startswith("lost: worker")
    assert second["status"] == "completed" and second["attempt"] == 2
    assert second["output"] == "second\n"
    assert second["worker"] != lost["worker"]
    assert recovered_after < 3 * lease + 5


async def test_a_killed_scheduler_leaves_nothing_undispatched(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    """Publishes that RabbitMQ does not confirm keep their claims; the scheduler dies
    holding them; once they expire another scheduler dispatches every task, once."""
    lease = 2.0
    env = service_env(prefix, TASKQ_LEASE_SECONDS=str(lease))
    ran = tmp_path / "ran"
    ids = [f"held-{n:02}" for n in range(20)]
    async with (
        running(["serve", "--roles", "api,consumer"], env, name="api") as api,
        amqp_channel() as channel,
    ):
        assert api.api_url is not None
        layout = AmqpLayout.for_prefix(prefix)
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            async with running(["serve", "--roles", "scheduler"], env, name="doomed") as doomed:
                # Unroutable from now on: publishes are returned, never confirmed.
                await channel.queue_unbind(layout.queue, layout.exchange, ROUTING_KEY)
                for task_id in ids:
                    body = {"id": task_id, "name": task_id, "command": f"echo {task_id} >> {ran}"}
                    await http.post("/tasks", json=body)
                    await http.post(f"/tasks/{task_id}/execute")
                claims = f"{prefix}claims"
                await eventually(lambda: _count(servers.hlen(claims), len(ids)), within=10)
                doomed.process.kill()
                await doomed.process.wait()
            await channel.queue_bind(layout.queue, layout.exchange, ROUTING_KEY)
            async with running(["serve", "--roles", "scheduler"], env, name="successor"):
                for task_id in ids:
                    task = await wait_for_task(http, task_id, {"completed", "failed"}, within=30)
                    assert task["status"] == "completed"
    executions = ran.read_text().split()
    print(f"{len(ids)} tasks claimed by a killed scheduler: {len(executions)} executions")
    assert sorted(executions) == ids


async def _count(pending: Awaitable[int], expected: int) -> bool:
    return await pending == expected


@asynccontextmanager
async def amqp_channel() -> AsyncGenerator[AbstractChannel]:
    async with aiormq.connect(AMQP_URL) as connection:
        yield await connection.channel()


async def test_three_schedulers_fire_1000_due_times_exactly_once(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    env = service_env(prefix, TASKQ_CONCURRENCY="16")
    ids = [f"due-{n:04}" for n in range(1000)]
    async with (
        running(["serve", "--roles", "api,consumer"], env, name="api") as api,
        running(["serve", "--roles", "scheduler"], env, name="scheduler-1"),
        running(["serve", "--roles", "scheduler"], env, name="scheduler-2"),
        running(["serve", "--roles", "scheduler"], env, name="scheduler-3"),
    ):
        assert api.api_url is not None
        at = datetime.now(UTC) + timedelta(seconds=6)
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            limiter = anyio.Semaphore(16)

            async def create(task_id: str) -> None:
                async with limiter:
                    body = {
                        "id": task_id,
                        "name": task_id,
                        "command": f"echo {task_id} >> {ran}",
                        # Spread over two seconds: due times close together, not identical.
                        "scheduled_at": (
                            at + timedelta(milliseconds=2 * int(task_id[4:]))
                        ).isoformat(),
                    }
                    response = await http.post("/tasks", json=body)
                    assert response.status_code == 201, response.text

            async with anyio.create_task_group() as tg:
                for task_id in ids:
                    tg.start_soon(create, task_id)
            # Due times that passed while tasks were still being created fire at once on
            # creation: all three schedulers are woken for them and race just the same.
            late = max(0.0, (datetime.now(UTC) - at).total_seconds())
            completed = f"{prefix}status:completed"
            await eventually(lambda: _count(servers.zcard(completed), len(ids)), within=90)
    executions = ran.read_text().split()
    duplicated = len(executions) - len(set(executions))
    lost = len(set(ids) - set(executions))
    print(f"1000 due times, 3 schedulers: {len(executions)} executions, "
          f"{duplicated} duplicated, {lost} lost; "
          f"creating ended {late:.1f} s after the first due time")  # fmt: skip
    assert duplicated == 0 and lost == 0


async def test_sigterm_lets_short_commands_finish_and_requeues_long_ones(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    grace = 2.0
    env = service_env(prefix, TASKQ_SHUTDOWN_GRACE=str(grace))
    short_started, long_started = tmp_path / "short", tmp_path / "long"
    commands = {
        "short": f"touch {short_started}; sleep 1; echo short done",
        # The first attempt outlives the grace period; the requeued one finishes at once.
        "long": f"if [ -e {long_started} ]; then echo long done; "
        f"else touch {long_started}; sleep 600; fi",
    }
    async with running(["serve", "--roles", "api,scheduler"], env, name="api") as api:
        assert api.api_url is not None
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            for task_id, command in commands.items():
                await http.post("/tasks", json={"id": task_id, "name": task_id, "command": command})
            async with running(["serve", "--roles", "consumer"], env, name="stopping") as consumer:
                for task_id in commands:
                    await http.post(f"/tasks/{task_id}/execute")
                await eventually(lambda: short_started.exists() and long_started.exists())
                stopped_at = anyio.current_time()
                code = await consumer.stop(signal.SIGTERM, deadline=grace + 10)
                took = anyio.current_time() - stopped_at
            short = (await http.get("/tasks/short")).json()
            long = (await http.get("/tasks/long")).json()
            assert short["status"] == "completed", "finished within the grace period"
            assert long["status"] == "pending", "given back, not lost and not stuck running"
            async with running(["serve", "--roles", "consumer"], env, name="next"):
                long = await wait_for_task(http, "long", {"completed", "failed"})
            long_runs = (await http.get("/tasks/long/runs", params={"output": "true"})).json()
    print(f"SIGTERM with 2 commands running: exit {code} after {took:.1f} s (grace {grace:g} s)")
    assert code == 0
    assert grace <= took < grace + 5
    assert long["status"] == "completed"
    done, interrupted = long_runs
    assert interrupted["status"] == "cancelled" and interrupted["error"] == "worker shut down"
    assert done["output"] == "long done\n"


async def test_a_dispatch_the_broker_gives_up_on_is_sent_again_then_fails_its_run(
    prefix: str, servers: redis.Redis
) -> None:
    layout = AmqpLayout.for_prefix(prefix)
    # A short lease: a dead-lettered dispatch is sent again one lease period later.
    env = service_env(prefix, TASKQ_LEASE_SECONDS="1")
    # No consumer role: the test plays consumers that give the message back without ever
    # starting its run, until RabbitMQ's delivery limit dead-letters it; three times.
    async with running(["serve", "--roles", "api,scheduler"], env, name="api+scheduler") as api:
        assert api.api_url is not None
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            body = {"id": "stuck", "name": "stuck", "command": "true"}
            assert (await http.post("/tasks", json=body)).status_code == 201
            run_id = (await http.post("/tasks/stuck/execute")).json()["run_id"]
            returned = 0
            async with aiormq.connect(AMQP_URL) as connection:
                channel = await connection.channel()
                with anyio.fail_after(WAIT_SECONDS):
                    while returned < DEAD_LETTER_LIMIT * (DELIVERY_LIMIT + 1):
                        message = await channel.basic_get(layout.queue, no_ack=False)
                        if isinstance(message.delivery, spec.Basic.GetEmpty):
                            await anyio.sleep(0.02)  # not (yet) sent again
                            continue
                        assert message.delivery_tag is not None
                        await channel.basic_reject(message.delivery_tag, requeue=True)
                        returned += 1
            task = await wait_for_task(http, "stuck", {"failed"})
            run = (await http.get(f"/tasks/stuck/runs/{run_id}")).json()
        assert await api.stop(signal.SIGTERM) == 0
    print(f"given back {returned} times; the run: {run['error']}")
    assert run["status"] == "failed" and run["error"] == DEAD_LETTERED_REASON
    assert run["dead_letters"] == DEAD_LETTER_LIMIT
    assert task["last_run"]["run_id"] == run_id
    # The scheduler took every dead letter off the dead-letter queue.
    async with aiormq.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        left = await channel.basic_get(layout.dead_letter_queue, no_ack=True)
    assert isinstance(left.delivery, spec.Basic.GetEmpty)

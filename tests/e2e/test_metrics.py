"""``/metrics`` of real ``taskq serve`` processes after known work: the counts, read the
way Prometheus reads them (the whole text must parse), in one process, with consumer
processes counted through their parent, and on ``TASKQ_METRICS_PORT`` without the api."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import eventually
from tests.e2e.harness import running, service_env, wait_for_task
from tests.e2e.servers import free_port

pytestmark = pytest.mark.e2e

# task id -> (command, timeout): 3 completed, 1 failed, 1 timed out.
WORK: dict[str, tuple[str, float | None]] = {
    "slow": ("sleep 30", 3.0),
    "ok-1": ("true", None),
    "ok-2": ('echo "metrics directory: ${PROMETHEUS_MULTIPROC_DIR:-none}"', None),
    "ok-3": ("exit 0", None),
    "fails": ("exit 3", None),
}
EXPECTED_OUTCOMES = {"completed": 3, "failed": 1, "timed_out": 1}


async def scrape(url: str) -> dict[str, Metric]:
    """The metric families at ``url``: the whole text must parse."""
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float | None:
    """The value of the sample named ``sample`` with exactly ``labels`` (no ``pid``), or
    the sum over processes of one that has a ``pid`` label besides."""
    family = families[re.sub(r"_(total|count|sum|bucket)$", "", sample)]
    found = [
        s.value
        for s in family.samples
        if s.name == sample and {k: v for k, v in s.labels.items() if k != "pid"} == labels
    ]
    return sum(found) if found else None


def counts(families: dict[str, Metric]) -> dict[str, float | None]:
    """What the known work must have counted."""
    outcomes = {
        o: value(families, "taskq_runs_finished_total", outcome=o) for o in EXPECTED_OUTCOMES
    }
    return {
        **outcomes,
        "started": value(families, "taskq_runs_started_total"),
        "durations": value(families, "taskq_run_duration_seconds_count"),
        "lateness": value(families, "taskq_run_lateness_seconds_count"),
        "dispatches": value(families, "taskq_scheduler_dispatches_total"),
    }


EXPECTED_COUNTS = {
    **EXPECTED_OUTCOMES,
    "started": 5,
    "durations": 5,
    "lateness": 5,
    "dispatches": 5,
}


async def do_known_work(api_url: str, metrics_url: str, *, slots: int) -> dict[str, Metric]:
    """Run ``WORK`` through the API; check the gauges while the slow command runs;
    return the metrics once everything is counted."""
    async with httpx.AsyncClient(base_url=api_url) as http:
        for task_id, (command, timeout) in WORK.items():
            body: dict[str, Any] = {"id": task_id, "name": task_id, "command": command}
            if timeout is not None:
                body["timeout"] = timeout
            assert (await http.post("/tasks", json=body)).status_code == 201
            assert (await http.post(f"/tasks/{task_id}/execute")).status_code == 202
            if task_id == "slow":
                await wait_for_task(http, "slow", {"running"})
                families = await scrape(metrics_url)
                assert value(families, "taskq_consumer_running_commands") == 1
                assert value(families, "taskq_consumer_free_slots") == slots - 1
        for task_id in WORK:
            await wait_for_task(http, task_id, {"completed", "failed"})

    families: dict[str, Metric] = {}

    async def all_counted() -> bool:
        nonlocal families
        families = await scrape(metrics_url)
        return counts(families) == EXPECTED_COUNTS

    try:
        await eventually(all_counted, within=10, every=0.1)
    finally:
        print(counts(families))
    assert value(families, "taskq_consumer_running_commands") == 0
    assert value(families, "taskq_consumer_free_slots") == slots
    return families


def route_labels(families: dict[str, Metric]) -> set[str]:
    return {s.labels["route"] for s in families["taskq_http_requests"].samples}


def metrics_directories(root: Path) -> list[Path]:
    """The metrics directories of ``taskq serve`` processes whose TMPDIR is ``root``."""
    return sorted(root.glob("taskq-metrics-*"))


def pids(samples: Iterable[Any]) -> Sequence[str]:
    return sorted(s.labels["pid"] for s in samples)


async def test_one_process_counts_the_known_work(prefix: str, servers: redis.Redis) -> None:
    env = service_env(prefix, TASKQ_CONCURRENCY="4")
    async with running(["serve"], env) as service:
        assert service.api_url is not None
        families = await do_known_work(service.api_url, f"{service.api_url}/metrics", slots=4)

    assert value(families, "taskq_http_requests_total", method="POST", route="/tasks", status="201")
    assert "/tasks/{task_id}/execute" in route_labels(families)
    assert not any(task_id in route for route in route_labels(families) for task_id in WORK)
    assert value(families, "taskq_store_up") == 1
    assert value(families, "taskq_broker_up") == 1
    assert value(families, "taskq_broker_queue_messages", queue="default") == 0
    [info] = families["taskq_info"].samples
    assert info.labels["roles"] == "api,scheduler,consumer"


async def test_consumer_processes_are_counted_in_their_parents_scrape(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    env = service_env(prefix, TASKQ_CONCURRENCY="2", TMPDIR=str(tmp_path))
    async with running(["serve", "--processes", "2"], env) as service:
        assert service.api_url is not None
        assert len(metrics_directories(tmp_path)) == 1
        families = await do_known_work(service.api_url, f"{service.api_url}/metrics", slots=4)
        async with httpx.AsyncClient(base_url=service.api_url) as http:
            [listed] = (await http.get("/tasks/ok-2/runs")).json()
            run = (await http.get(f"/tasks/ok-2/runs/{listed['run_id']}")).json()
        assert run["output"] == "metrics directory: none\n"  # commands do not write there
        ours = str(service.process.pid)
        roles = {s.labels["pid"]: s.labels["roles"] for s in families["taskq_info"].samples}
        assert roles.pop(ours) == "api,scheduler,consumer"
        assert list(roles.values()) == ["consumer", "consumer"]
        assert pids(families["taskq_store_up"].samples) == sorted([ours, *roles])
        assert {s.value for s in families["taskq_broker_up"].samples} == {1}
        assert await service.stop() == 0
    assert metrics_directories(tmp_path) == []


async def test_a_process_without_the_api_serves_metrics_on_its_own_port(
    prefix: str, servers: redis.Redis
) -> None:
    port = free_port()
    scheduler_env = service_env(prefix, TASKQ_METRICS_PORT=str(port))
    async with (
        running(["serve", "--roles", "scheduler"], scheduler_env, name="scheduler") as scheduler,
        running(["serve", "--roles", "consumer"], service_env(prefix), name="consumer") as consumer,
        running(["serve", "--roles", "api"], service_env(prefix), name="api") as api,
    ):
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        [ready] = [line for line in scheduler.log if "taskq ready:" in line]
        assert ready.endswith(f"taskq ready: scheduler, metrics on {metrics_url}"), ready
        assert any("no metrics endpoint" in line for line in consumer.log), consumer.dump()
        assert api.api_url is not None
        async with httpx.AsyncClient(base_url=api.api_url) as http:
            body = {"id": "one", "name": "one", "command": "true"}
            assert (await http.post("/tasks", json=body)).status_code == 201
            assert (await http.post("/tasks/one/execute")).status_code == 202
            await wait_for_task(http, "one", {"completed"})

        async def dispatched() -> bool:
            families = await scrape(metrics_url)
            return value(families, "taskq_scheduler_dispatches_total") == 1

        await eventually(dispatched, within=10, every=0.1)
        families = await scrape(metrics_url)
        [info] = families["taskq_info"].samples
        assert info.labels["roles"] == "scheduler"
        assert value(families, "taskq_runs_started_total") == 0  # counted where it started
        assert value(families, "taskq_scheduler_due_entries") is not None
        assert not families["taskq_http_requests"].samples  # no API in this process


async def test_a_scrape_answers_at_once_and_says_so_while_the_broker_is_down(
    prefix: str, servers: redis.Redis
) -> None:
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    env = service_env(prefix, AMQP_URL=nowhere)
    async with running(["serve", "--roles", "api"], env, name="api") as api:
        with anyio.fail_after(1):
            families = await scrape(f"{api.api_url}/metrics")
        assert value(families, "taskq_store_up") == 1
        assert value(families, "taskq_broker_up") == 0

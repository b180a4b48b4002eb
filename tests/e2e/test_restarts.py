"""Promises kept when the servers restart: RabbitMQ and Redis really go away and come back.

Each test uses a throwaway server of its own (``tests/e2e/servers.py``), never the shared
ones, runs real ``taskq`` processes against it, submits tasks before, during and after
the outage, and then checks task by task, straight from Redis, that every acknowledged task
reached a terminal state, ran, and ran once where the design promises once. What went
wrong is collected and reported together with what was observed, so one run of a test
tells the whole story rather than its first broken promise.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import REDIS_URL, eventually
from tests.e2e.harness import ServiceProcess, running, service_env
from tests.e2e.servers import throwaway_rabbitmq, throwaway_redis

pytestmark = pytest.mark.e2e

BATCH = 50
LEASE_SECONDS = 5.0
# Long enough for several commands to be running when the server goes away.
COMMAND = "sleep 0.2; echo {task_id} >> {ran}"
REQUEST_SECONDS = 10.0  # an API call that takes longer than this "hung"
OUTAGE_SECONDS = 3.0  # the server stays away at least this long
RECOVERY_SECONDS = 30.0  # /health is 200 again within this after the server is back
SETTLE_SECONDS = 40.0  # every acknowledged task is terminal within this after the last submit
TERMINAL = frozenset({"completed", "failed", "cancelled"})


@dataclass
class Report:
    """What a test saw, and the promises it saw broken."""

    title: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def note(self, line: str) -> None:
        self.notes.append(line)

    def finish(self) -> None:
        print(f"\n=== {self.title} ===")
        for line in self.notes:
            print(line)
        for problem in self.problems:
            print(f"BROKEN: {problem}")
        assert not self.problems, "\n".join(self.problems)


async def within(condition: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """Whether ``condition`` came true within ``seconds`` (polled, bounded)."""
    try:
        await eventually(condition, within=seconds, every=0.1)
    except TimeoutError:
        return False
    return True


def batch(stage: str) -> list[str]:
    return [f"{stage}-{n:03}" for n in range(BATCH)]


async def submit(http: httpx.AsyncClient, task_ids: Sequence[str], ran: Path) -> dict[str, str]:
    """Create and execute each task (8 requests at a time); for each id, ``"ok"`` when
    both were acknowledged (201, then 202), else what the API answered instead."""
    outcome: dict[str, str] = {}
    limiter = anyio.Semaphore(8)

    async def one(task_id: str) -> None:
        body = {"id": task_id, "name": task_id, "command": COMMAND.format(task_id=task_id, ran=ran)}
        async with limiter:
            for method, path, expected in (
                ("POST", "/tasks", 201),
                ("POST", f"/tasks/{task_id}/execute", 202),
            ):
                outcome[task_id] = await _request(
                    http, method, path, expected, json=body if path == "/tasks" else None
                )
                if outcome[task_id] != "ok":
                    return

    async with anyio.create_task_group() as tg:
        for task_id in task_ids:
            tg.start_soon(one, task_id)
    return outcome


async def _request(
    http: httpx.AsyncClient, method: str, path: str, expected: int, *, json: Any = None
) -> str:
    try:
        with anyio.fail_after(REQUEST_SECONDS):
            response = await http.request(method, path, json=json)
    except TimeoutError:
        return f"{method} {path}: no answer within {REQUEST_SECONDS:g} s (hung)"
    except httpx.HTTPError as exc:
        return f"{method} {path}: {type(exc).__name__}: {exc}"
    if response.status_code != expected:
        return f"{method} {path}: {response.status_code} {response.text[:200]}"
    return "ok"


def summarize(outcome: dict[str, str]) -> str:
    counts = Counter(
        "ok" if v == "ok" else v.split(":", 1)[1].strip()[:60] for v in outcome.values()
    )
    return ", ".join(f"{n} x {what}" for what, n in counts.most_common())


def acknowledged(outcome: dict[str, str]) -> set[str]:
    return {task_id for task_id, result in outcome.items() if result == "ok"}


async def health(http: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    """``/health``'s status code and each dependency's status (``(0, {})`` without answer)."""
    try:
        with anyio.fail_after(REQUEST_SECONDS):
            response = await http.get("/health")
        checks: dict[str, Any] = response.json().get("checks", {})
    except (TimeoutError, httpx.HTTPError, ValueError, AttributeError):
        return 0, {}
    return response.status_code, {name: check.get("status") for name, check in checks.items()}


class TaskStates:
    """Tasks and runs as stored in Redis (documented layout), read without the API."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis_url = redis_url
        self.prefix = prefix

    async def tasks(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        task_ids = sorted(task_ids)
        if not task_ids:
            return {}
        async with self._client() as client:
            docs = await client.mget([f"{self.prefix}task:{t}" for t in task_ids])
        return {
            t: None if d is None else json.loads(d) for t, d in zip(task_ids, docs, strict=True)
        }

    async def statuses(self, task_ids: Iterable[str]) -> dict[str, str | None]:
        tasks = await self.tasks(task_ids)
        return {t: None if doc is None else doc["status"] for t, doc in tasks.items()}

    async def runs(self, task_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        task_ids = sorted(task_ids)
        async with self._client() as client, client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hvals(f"{self.prefix}runs:{task_id}")
            results: list[list[str]] = await pipe.execute()
        return {
            task_id: sorted((json.loads(r) for r in docs), key=lambda run: run["attempt"])
            for task_id, docs in zip(task_ids, results, strict=True)
        }

    def _client(self) -> redis.Redis:
        # A connection per look: the server may have restarted since the last one.
        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)

    async def all_terminal(self, task_ids: set[str]) -> bool:
        try:
            statuses = await self.statuses(task_ids)
        except redis.RedisError:
            return False
        return all(status in TERMINAL for status in statuses.values())


def alive(processes: Sequence[ServiceProcess], report: Report, when: str) -> bool:
    """Report every process that exited; whether all are still running."""
    ok = True
    for service in processes:
        code = service.process.returncode
        if code is not None:
            report.expect(False, f"{service.name} exited with {code} {when}: {why(service)}")
            ok = False
    return ok


def why(service: ServiceProcess) -> str:
    """The line of a process's log that says why it stopped."""
    for line in service.log:
        if "crashed" in line or "CRITICAL" in line:
            return line
    return " | ".join(service.log[-3:])


def any_exited(processes: Sequence[ServiceProcess]) -> bool:
    return any(p.process.returncode is not None for p in processes)


def count_executions(ran: Path) -> Counter[str]:
    """How many times each command ran (each appends its task id to ``ran``)."""
    return Counter(ran.read_text().split()) if ran.exists() else Counter()


async def check_every_task(
    report: Report,
    states: TaskStates,
    ran: Path,
    *,
    submitted: dict[str, set[str]],
    may_repeat: set[str],
) -> None:
    """Every acknowledged task: still stored, completed, run (and recorded) exactly once,
    except that those in ``may_repeat`` (in flight at the outage) may have run again."""
    every = set().union(*submitted.values())
    tasks = await states.tasks(every)
    runs = await states.runs(every)
    executions = count_executions(ran)
    statuses = Counter(doc["status"] if doc else "missing" for doc in tasks.values())
    missing = sorted(t for t, doc in tasks.items() if doc is None)
    never_ran = sorted(t for t in every if executions[t] == 0)
    duplicated = sorted(t for t in every if executions[t] > 1)
    retried = sorted(t for t in every if len(runs[t]) > 1)
    not_once = sorted(
        t
        for t in every
        if [r["status"] for r in runs[t]].count("completed") != 1 or len(runs[t]) != 1
    )
    report.note(
        f"submitted {len(every)} ("
        + ", ".join(f"{stage} {len(ids)}" for stage, ids in submitted.items())
        + f"); final statuses {dict(statuses)}; executions {sum(executions.values())}"
    )
    report.note(
        f"completed {statuses['completed']}, retried {len(retried)} {retried[:10]}, "
        f"duplicated {len(duplicated)} {duplicated[:10]} "
        f"(of {len(may_repeat)} in flight at the outage), "
        f"lost {len(missing) + len(never_ran)} (missing {missing[:10]}, never ran {never_ran[:10]})"
    )
    report.expect(not missing, f"acknowledged tasks no longer stored: {missing}")
    report.expect(
        statuses["completed"] == len(every),
        f"not completed: {sorted(t for t, d in tasks.items() if d and d['status'] != 'completed')}",
    )
    report.expect(not never_ran, f"acknowledged tasks that never ran: {never_ran}")
    report.expect(
        not set(duplicated) - may_repeat,
        f"ran more than once although not in flight at the outage: "
        f"{sorted(set(duplicated) - may_repeat)}",
    )
    report.expect(
        not set(not_once) - may_repeat,
        "run records other than one completed run although not in flight at the outage: "
        + ", ".join(
            f"{t}: {[(r['attempt'], r['status'], r.get('error')) for r in runs[t]]}"
            for t in sorted(set(not_once) - may_repeat)[:10]
        ),
    )


async def test_rabbitmq_restarted_under_load_loses_and_repeats_nothing(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    report = Report("RabbitMQ stop_app/start_app under load")
    ran = tmp_path / "ran"
    states = TaskStates(REDIS_URL, prefix)  # the shared Redis, under the test's prefix
    async with throwaway_rabbitmq(tmp_path) as node:
        report.note(f"throwaway RabbitMQ node started in {node.started_in:.1f} s")
        env = service_env(prefix, AMQP_URL=node.url, TASKQ_LEASE_SECONDS=str(LEASE_SECONDS))
        async with (
            running(["serve", "--roles", "api,scheduler"], env, name="api") as api,
            running(["serve", "--roles", "consumer"], env, name="consumer-1") as consumer_1,
            running(["serve", "--roles", "consumer"], env, name="consumer-2") as consumer_2,
        ):
            processes = [api, consumer_1, consumer_2]
            assert api.api_url is not None
            async with httpx.AsyncClient(base_url=api.api_url) as http:
                before = await submit(http, batch("before"), ran)
                report.note(f"before the outage: {summarize(before)}")
                report.expect(len(acknowledged(before)) == BATCH, "refused before the outage")
                at_stop = await states.statuses(acknowledged(before))
                in_flight = {t for t, s in at_stop.items() if s not in TERMINAL}
                report.note(
                    f"at stop_app: {Counter(at_stop.values())}; "
                    f"{len(in_flight)} not finished (these alone may run twice)"
                )

                await node.stop_app()
                down_at = anyio.current_time()
                seen: tuple[int, dict[str, str]] = (0, {})

                async def reports_outage() -> bool:
                    nonlocal seen
                    seen = await health(http)
                    return seen[0] == 503 and seen[1].get("broker") == "down"

                report.expect(
                    await within(reports_outage, 10),
                    f"/health during the outage: {seen} (wanted 503, broker down)",
                )
                report.note(f"/health during the outage: {seen}")
                during = await submit(http, batch("during"), ran)
                report.note(f"during the outage: {summarize(during)}")
                report.expect(
                    len(acknowledged(during)) == BATCH,
                    f"the API refused tasks while only the broker was down: {summarize(during)}",
                )
                alive(processes, report, "while RabbitMQ was down")
                await recover_and_check(
                    report,
                    http,
                    processes,
                    states,
                    ran,
                    restart=node.start_app,
                    what="RabbitMQ",
                    down_at=down_at,
                    before=before,
                    during=during,
                    in_flight=in_flight,
                )


async def test_redis_killed_and_restarted_loses_no_acknowledged_task(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    report = Report("Redis (AOF, appendfsync always) SIGKILLed and restarted under load")
    ran = tmp_path / "ran"
    async with throwaway_redis(tmp_path, appendonly=True) as store:
        states = TaskStates(store.url, prefix)
        env = service_env(prefix, REDIS_URL=store.url, TASKQ_LEASE_SECONDS=str(LEASE_SECONDS))
        async with (
            running(["serve"], env, name="all-roles") as service,
            running(["serve", "--roles", "consumer"], env, name="consumer") as consumer,
        ):
            processes = [service, consumer]
            assert service.api_url is not None
            async with httpx.AsyncClient(base_url=service.api_url) as http:
                before = await submit(http, batch("before"), ran)
                report.note(f"before the kill: {summarize(before)}")
                report.expect(len(acknowledged(before)) == BATCH, "refused before the kill")
                at_kill = await states.statuses(acknowledged(before))
                in_flight = {t for t, s in at_kill.items() if s not in TERMINAL}

                await store.kill()
                down_at = anyio.current_time()
                report.note(
                    f"at the kill: {Counter(at_kill.values())}; "
                    f"{len(in_flight)} not finished (these alone may run twice)"
                )
                seen: tuple[int, dict[str, str]] = (0, {})

                async def reports_outage() -> bool:
                    nonlocal seen
                    seen = await health(http)
                    return seen[0] == 503 and seen[1].get("store") == "down"

                report.expect(
                    await within(reports_outage, 10),
                    f"/health while Redis was down: {seen} (wanted 503, store down)",
                )
                report.note(f"/health while Redis was down: {seen}")
                during = await submit(http, batch("during")[:5], ran)
                report.note(f"submitted while Redis was down: {summarize(during)}")
                report.expect(
                    all(result.startswith("POST /tasks: 503 ") for result in during.values()),
                    f"wanted 503 for every create while Redis was down: {summarize(during)}",
                )
                alive(processes, report, "while Redis was down")
                await recover_and_check(
                    report,
                    http,
                    processes,
                    states,
                    ran,
                    restart=store.start,
                    what="Redis",
                    down_at=down_at,
                    before=before,
                    during=during,
                    in_flight=in_flight,
                )


async def recover_and_check(
    report: Report,
    http: httpx.AsyncClient,
    processes: Sequence[ServiceProcess],
    states: TaskStates,
    ran: Path,
    *,
    restart: Callable[[], Awaitable[None]],
    what: str,
    down_at: float,
    before: dict[str, str],
    during: dict[str, str],
    in_flight: set[str],
) -> None:
    """End the outage, submit a last batch, and check every task, one by one."""
    await anyio.sleep(max(0.0, OUTAGE_SECONDS - (anyio.current_time() - down_at)))
    await restart()
    up_at = anyio.current_time()
    report.note(f"{what} was down {up_at - down_at:.1f} s")
    seen: tuple[int, dict[str, str]] = (0, {})

    async def healthy() -> bool:
        nonlocal seen
        seen = await health(http)
        return seen[0] == 200 or any_exited(processes)

    recovered = await within(healthy, RECOVERY_SECONDS) and seen[0] == 200
    report.expect(recovered, f"/health after the restart: {seen} (wanted 200)")
    if recovered:
        report.note(f"/health 200 again {anyio.current_time() - up_at:.1f} s later")
    after = await submit(http, batch("after"), ran)
    report.note(f"after the outage: {summarize(after)}")
    report.expect(len(acknowledged(after)) == BATCH, "refused after the outage")

    # A create the API acknowledged during the outage counts like any other.
    submitted = {
        "before": acknowledged(before),
        "during": acknowledged(during),
        "after": acknowledged(after),
    }
    every = set().union(*submitted.values())
    settled = await within(lambda: _settled_or_dead(states, every, processes), SETTLE_SECONDS)
    report.expect(
        settled and await states.all_terminal(every),
        f"not every task terminal {SETTLE_SECONDS:g} s after the last submit",
    )
    await check_every_task(report, states, ran, submitted=submitted, may_repeat=in_flight)
    alive(processes, report, "by the end")
    report.finish()


async def _settled_or_dead(
    states: TaskStates, task_ids: set[str], processes: Sequence[ServiceProcess]
) -> bool:
    """Done waiting: every task is terminal, or a process exited (a broken promise
    already, and the tasks it held would only be recovered after a restart)."""
    return any_exited(processes) or await states.all_terminal(task_ids)

"""What must hold while taskq gets faster, measured: listing with 100k tasks stored, the
API's memory over them, and a consumer's memory under a command printing 1 GB.

    .venv/bin/python -m tests.bench.holds [--tasks 100000] [--output-bytes 1000000000] \
        [--api "serve --roles api"] [--consumer "serve"] [--printer "yes | head -c {bytes}"] \
        [--parts abc]

(a) ``GET /tasks?limit=100`` with ``--tasks`` stored (60 % completed, 20 % failed, 20 %
    created, written through ``RedisStore.commit_each``, the path every change takes, so
    the layout is the real one): p50 / p99 of sequential requests (aiohttp, one
    connection), unfiltered, filtered by status, and from a cursor in the middle; then
    every page, in order. Goal: p50 < 5 ms.
(b) The API deployment's RSS (``VmRSS`` of its taskq processes) before the tasks are
    written, after, after the timed requests and after listing every page. Goal: flat
    (the issue measured 58 -> 62 MB).
(c) A command printing ``--output-bytes`` run by a real consumer (``--consumer``, default
    ``taskq serve`` with default settings), once per ``--printer``: NUL bytes
    (``head -c N /dev/zero``) and text (``yes | head -c N``), since JSON stores a NUL as
    six characters and the stored output is JSON. The figure is the most any of the
    deployment's taskq processes grew above its RSS before (sampled every 10 ms, and
    ``VmHWM`` reset just before); the run's stored output must be capped
    (``truncated``). Goal: < +10 MiB.

Every figure is printed next to its goal; nothing is asserted (timings on these shared
machines swing). Everything made is under a unique prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import UTC, datetime, timedelta

import anyio

from app.adapters.redis_store import open_redis_store
from app.domain import (
    UNSCHEDULE,
    Outcome,
    Task,
    create,
    finish_run,
    queue_run,
    start_run,
)
from app.ports import TaskChange
from app.service import encode_cursor
from tests.bench.deployments import (
    ONE_PROCESS,
    Api,
    bench_env,
    deployed,
    forget,
    label,
    wait_finished,
)
from tests.bench.figures import family, memory_kib, percentile, reset_peak
from tests.conftest import REDIS_URL

WRITE_BATCH = 1000
"""Changes per ``commit_each`` round trip while filling the store."""
TIMED_REQUESTS = 500
LIST_GOAL_MS = 5.0
RSS_GOAL_MIB = 4.0
CONSUMER_GOAL_MIB = 10.0
SAMPLE_SECONDS = 0.01
PRINTERS = ["head -c {bytes} /dev/zero", "yes | head -c {bytes}"]
"""Commands printing ``{bytes}``: NUL bytes (JSON stores each as 6 characters) and text."""


def task_id(n: int) -> str:
    return f"stored-{n:07}"


def stored_change(n: int, now: datetime) -> TaskChange:
    """Task ``n`` as a real life leaves it: 6 in 10 completed, 2 failed (each with its
    run), 2 created and never run."""
    task = Task(
        id=task_id(n), name=f"stored task {n}", command="true", created_at=now, updated_at=now
    )
    if n % 10 >= 8:
        return TaskChange.of(create(task))
    queued = queue_run(task, now)
    started = start_run(
        queued.task, queued.run, "bench:1", now, lease_until=now + timedelta(seconds=30)
    )
    exit_code = 0 if n % 10 < 6 else 1
    outcome = Outcome(exit_code=exit_code, duration=0.002, output="", truncated=False)
    finished = finish_run(started.task, started.run, outcome, now)
    return TaskChange(task.id, None, finished.task, finished.runs, UNSCHEDULE)


async def fill(prefix: str, count: int) -> float:
    """Write ``count`` tasks under ``prefix``; return the tasks written a second."""
    now = datetime.now(UTC)
    started = time.perf_counter()
    async with open_redis_store(REDIS_URL, prefix=prefix, run_history=100) as store:
        for first in range(0, count, WRITE_BATCH):
            last = min(count, first + WRITE_BATCH)
            applied = await store.commit_each([stored_change(n, now) for n in range(first, last)])
            if not all(applied):
                raise AssertionError(f"a stored task of {first}..{last} was not written")
    return count / (time.perf_counter() - started)


def rss_mib(pid: int) -> float:
    """RSS of the taskq processes of the deployment rooted at ``pid``, MiB."""
    return sum(memory_kib(member) for member in family(pid)) / 1024


async def timed_gets(api: Api, params: dict[str, str], count: int) -> list[float]:
    """ms of ``count`` sequential ``GET /tasks`` (after a few untimed ones)."""
    took: list[float] = []
    for n in range(count + 20):
        started = time.perf_counter()
        status, page, _ = await api.call("GET", "/tasks", params=params)
        if n >= 20:
            took.append(1000 * (time.perf_counter() - started))
        if status != 200 or len(page) != int(params["limit"]):
            raise AssertionError(f"GET /tasks {params}: {status}, {len(page)} tasks")
    return took


async def every_page(api: Api) -> tuple[int, list[float]]:
    """Tasks listed and ms per page, following ``X-Next-Cursor`` from the first page."""
    params = {"limit": "100"}
    listed, took = 0, []
    while True:
        started = time.perf_counter()
        _, page, headers = await api.call("GET", "/tasks", params=params)
        took.append(1000 * (time.perf_counter() - started))
        listed += len(page)
        if "X-Next-Cursor" not in headers:
            return listed, took
        params = {"limit": "100", "cursor": headers["X-Next-Cursor"]}


def latency_line(name: str, took: list[float]) -> str:
    p50 = percentile(took, 50)
    verdict = "ok" if p50 < LIST_GOAL_MS else "MISSED"
    return (
        f"  {name}: p50 {p50:.2f} ms, p99 {percentile(took, 99):.2f} ms "
        f"({len(took)} requests; goal p50 < {LIST_GOAL_MS:g} ms: {verdict})"
    )


async def listing_and_api_memory(deployment: str, count: int) -> None:
    prefix = f"taskq-holds-{uuid.uuid4().hex[:8]}:"
    try:
        async with deployed(deployment, bench_env(prefix)) as running, Api(running.api_url) as api:
            root = running.pids[0]
            rss = {"before writing": rss_mib(root)}
            rate = await fill(prefix, count)
            print(
                f"(a) GET /tasks?limit=100 with {count:,} tasks stored (written at {rate:,.0f}/s):"
            )
            rss[f"after {count:,} written"] = rss_mib(root)
            queries = {
                "unfiltered": {},
                "status=completed": {"status": "completed"},
                "status=failed": {"status": "failed"},
                "status=created": {"status": "created"},
                "from a cursor half-way": {"cursor": encode_cursor(task_id(count // 2))},
            }
            for name, query in queries.items():
                took = await timed_gets(api, {"limit": "100", **query}, TIMED_REQUESTS)
                print(latency_line(name, took))
            rss["after the timed requests"] = rss_mib(root)
            listed, took = await every_page(api)
            print(latency_line(f"every page in turn ({listed:,} tasks listed)", took))
            rss["after listing every page"] = rss_mib(root)
    finally:
        await forget(prefix)
    first = rss["before writing"]
    print(f"(b) API RSS ({label(deployment)}; goal: flat, about +{RSS_GOAL_MIB:g} MiB at most):")
    for moment, mib in rss.items():
        print(f"  {moment}: {mib:.1f} MiB ({mib - first:+.1f} MiB)")


async def peak_growth(pids: list[int], done: anyio.Event) -> dict[int, int]:
    """The highest RSS (KiB) each of ``pids`` reached until ``done``, sampled."""
    peaks = {pid: memory_kib(pid) for pid in pids}
    while not done.is_set():
        for pid in pids:
            peaks[pid] = max(peaks[pid], memory_kib(pid))
        await anyio.sleep(SAMPLE_SECONDS)
    return peaks


async def consumer_memory(deployment: str, output_bytes: int, printer: str) -> None:
    prefix = f"taskq-holds-{uuid.uuid4().hex[:8]}:"
    command = printer.format(bytes=output_bytes)
    try:
        async with deployed(deployment, bench_env(prefix)) as running, Api(running.api_url) as api:
            now = datetime.now(UTC).isoformat()
            warm = {"id": "warm", "name": "warm", "command": "echo warm", "scheduled_at": now}
            await api.create_all([warm])
            await wait_finished(prefix, 1, within=30)

            pids = [member for root in running.pids for member in family(root)]
            before = {pid: memory_kib(pid) for pid in pids}
            for pid in pids:
                reset_peak(pid)
            done = anyio.Event()
            peaks: dict[int, int] = {}

            async def sample() -> None:
                peaks.update(await peak_growth(pids, done))

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                now = datetime.now(UTC).isoformat()
                big = {"id": "big", "name": "big", "command": command, "scheduled_at": now}
                await api.create_all([big])
                await wait_finished(prefix, 2, within=600)
                done.set()
            took = time.perf_counter() - started
            grown = {pid: max(peaks[pid], memory_kib(pid, "VmHWM")) - before[pid] for pid in pids}
            listed = (await api.runs_of(["big"]))["big"][0]
            _, run, _ = await api.call("GET", f"/tasks/big/runs/{listed['run_id']}")
    finally:
        await forget(prefix)
    worst = max(grown, key=lambda pid: grown[pid])
    mib = grown[worst] / 1024
    verdict = "ok" if mib < CONSUMER_GOAL_MIB else "MISSED"
    print(
        f"(c) `{command}` through `{label(deployment)}` ({len(pids)} taskq process(es)), "
        f"ran in {took:.1f} s:"
    )
    print(
        f"  consumer peak RSS growth {mib:+.1f} MiB (process {worst}, from "
        f"{before[worst] / 1024:.1f} MiB; goal < +{CONSUMER_GOAL_MIB:g} MiB: {verdict})"
    )
    capped = "ok" if run["truncated"] and len(run["output"]) < output_bytes else "MISSED"
    print(
        f"  run {run['status']}, exit {run['exit_code']}: stored output "
        f"{len(run['output']):,} characters, truncated={run['truncated']} "
        f"(goal: capped, truncated: {capped})"
    )


async def main(
    parts: str, api: str, consumer: str, tasks: int, output_bytes: int, printers: list[str]
) -> None:
    if "a" in parts or "b" in parts:
        await listing_and_api_memory(api, tasks)
    if "c" in parts:
        for printer in printers:
            await consumer_memory(consumer, output_bytes, printer)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Listing, API memory, consumer memory")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--output-bytes", type=int, default=1_000_000_000)
    parser.add_argument(
        "--api", default="serve --roles api", metavar="DEPLOYMENT", help="for (a) and (b)"
    )
    parser.add_argument("--consumer", default=ONE_PROCESS, metavar="DEPLOYMENT", help="for (c)")
    parser.add_argument(
        "--printer",
        action="append",
        help=f"command printing {{bytes}} for (c) (repeatable; default {PRINTERS})",
    )
    parser.add_argument("--parts", default="abc", help="which to measure: a, b (together), c")
    options = parser.parse_args()
    anyio.run(
        main,
        options.parts,
        options.api,
        options.consumer,
        options.tasks,
        options.output_bytes,
        options.printer or PRINTERS,
    )

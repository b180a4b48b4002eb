"""CPU the metrics cost a run, in one process and in the multiprocess mode of
``taskq serve --processes N``: what a run's life counts (claim, dispatch, start, finish,
two slot changes, a running command, two API requests), timed in a loop; and what its
lifecycle events cost taskq's processes (derived from the four transitions of a task
created and run once, and encoded as the Redis store writes them). What the events cost
Redis (an ``XADD`` each) is measured in the real workload by ``tests.bench.watching_cost``.

    .venv/bin/python -m tests.bench.metrics_cost [-n 20000]

Compare its figures with the CPU taskq spends a task (``tests.bench.cpu_budget``,
about 2.7 ms in taskq's own processes): a bound that the load of the machine hardly
moves, where an end-to-end throughput run on a busy machine swings by 2x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import anyio
from litestar.types import Message, Receive, Scope, Send

from app.metrics_directory import MULTIPROCESS_VARIABLE

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def per_run_microseconds(count: int) -> float:
    """CPU microseconds the metrics of one run's life cost in this process (two API
    requests, a claim, a dispatch, a start, a finish and their gauges)."""
    from app.domain import Outcome, Task, finish_run, queue_run, start_run
    from app.metrics import CLAIMS, DISPATCHES, FREE_SLOTS, RUNNING_COMMANDS, count_committed

    task = Task(id="t", name="t", command="true", created_at=NOW, updated_at=NOW)
    queued = queue_run(task, NOW)
    started = start_run(queued.task, queued.run, "w", NOW, lease_until=NOW + timedelta(30))
    result = Outcome(exit_code=0, duration=0.01, output="", truncated=False)
    finished = finish_run(started.task, started.run, result, NOW)
    requests = anyio.run(requests_microseconds, count)
    begin = time.process_time()
    for _ in range(count):
        CLAIMS.inc()
        DISPATCHES.inc()
        FREE_SLOTS.dec()
        count_committed(started)
        RUNNING_COMMANDS.inc()
        RUNNING_COMMANDS.dec()
        count_committed(finished)
        FREE_SLOTS.inc()
    return (time.process_time() - begin) / count * 1e6 + 2 * requests


def events_microseconds(count: int) -> float:
    """CPU microseconds the lifecycle events of one task's life cost: created, a run
    queued, started and finished, each derived from its transition and encoded."""
    from app.adapters.redis_store import _event_lines  # pyright: ignore[reportPrivateUsage]
    from app.domain import Outcome, Task, create, finish_run, queue_run, start_run
    from app.events import lifecycle_events

    task = Task(id="t", name="t", command="true", created_at=NOW, updated_at=NOW)
    created = create(task)
    queued = queue_run(task, NOW)
    started = start_run(queued.task, queued.run, "w", NOW, lease_until=NOW + timedelta(30))
    result = Outcome(exit_code=0, duration=0.01, output="", truncated=False)
    finished = finish_run(started.task, started.run, result, NOW)
    life = (created, queued, started, finished)
    assert all(len(lifecycle_events(transition)) == 1 for transition in life)
    begin = time.process_time()
    for _ in range(count):
        for transition in life:
            _event_lines(lifecycle_events(transition))
    return (time.process_time() - begin) / count * 1e6


async def requests_microseconds(count: int) -> float:
    """CPU microseconds ``RequestMetrics`` adds to a request, over an application that
    only answers."""
    from app.metrics_http import RequestMetrics

    start = cast(Message, {"type": "http.response.start", "status": 201, "headers": []})
    body = cast(Message, {"type": "http.response.body", "body": b""})

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send(body)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    scope = cast(Scope, {"type": "http", "method": "POST", "path_template": "/tasks"})
    timings: list[float] = []
    for app in (answer, RequestMetrics(answer)):
        begin = time.process_time()
        for _ in range(count):
            await app(scope, receive, send)
        timings.append(time.process_time() - begin)
    return (timings[1] - timings[0]) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU the metrics cost a run")
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--in-this-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_this_process:
        print(f"{per_run_microseconds(args.n):.1f}")
        return
    command = [sys.executable, "-m", "tests.bench.metrics_cost", "-n", str(args.n)]
    command.append("--in-this-process")
    one = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, MULTIPROCESS_VARIABLE: directory}
        several = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    print(f"metrics of one run's life: {one} µs of CPU in one process,")
    print(f"{several.stdout.strip()} µs in the multiprocess mode of serve --processes N")
    print(f"lifecycle events of one task's life: {events_microseconds(args.n):.1f} µs of CPU")


if __name__ == "__main__":
    main()

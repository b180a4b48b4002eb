"""Lateness under a burst, taskq against Celery in one run.

    .venv/bin/python -m tests.bench.burst [--tasks 1000] [--spread 1] \
        [--taskq "serve" --taskq "serve --roles api,scheduler + serve --roles consumer ..."]

A burst is ``--tasks`` x ``true`` due evenly over ``--spread`` seconds (1,000 in one
second by default, far more than either system runs a second here, so a backlog builds;
``--spread 0`` makes them all due at one instant). Every task is created well before the
first one is due (over HTTP, aiohttp, 32 requests in flight; Celery: ``apply_async`` with
an ETA), so that only dispatch is measured. Lateness is ``started_at - due`` (Celery: the
task's ``time.time()`` just before it spawns, ``../shared/peers/celery/tasks.py``).

Each ``--taskq`` is one deployment (default: ``taskq serve`` with default settings, then
the split deployment, api+scheduler and two consumers; see ``tests/bench/deployments``),
run in turn, then Celery prefork with 8 processes on the same Redis and RabbitMQ, through
``tests/bench/celery_burst.py`` in the Celery venv (made as ``../shared/peers/compare``
makes it when missing). One line per system, then taskq / Celery ratios: compare those,
not absolute figures, which swing 2x within an hour on these shared machines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from tests.bench.deployments import (
    ONE_PROCESS,
    SPLIT,
    Api,
    bench_env,
    deployed,
    forget,
    label,
    wait_finished,
)
from tests.bench.figures import percentile

CELERY_VENV = Path("/tmp/celery-venv")
CELERY_SIDE = Path(__file__).with_name("celery_burst.py")
WARM_UP = 32
"""`true` tasks run before the burst, as ``../shared/peers`` warms both systems up."""


@dataclass
class Lateness:
    label: str
    lateness_ms: list[float]
    drained_s: float
    """From the first due time until the last run finished."""
    note: str

    def line(self) -> str:
        late = self.lateness_ms
        early = sum(1 for value in late if value < 0)
        return (
            f"{self.label}: {len(late)} due over the burst: lateness p50 {self.p(50):.1f} ms, "
            f"p99 {self.p(99):.1f} ms, max {max(late):.1f} ms, early {early}; all done "
            f"{self.drained_s:.2f} s after the first due ({self.note})"
        )

    def p(self, rank: float) -> float:
        return percentile(self.lateness_ms, rank)


def planned_lead(tasks: int, lead: float | None) -> float:
    """Seconds from the start of creation to the first due time: enough to create every
    task first on a busy 2-core machine (~150 creates/s at worst), unless given."""
    return lead if lead is not None else 2 + tasks / 150


async def taskq_burst(deployment: str, tasks: int, spread: float, lead: float) -> Lateness:
    prefix = f"taskq-burst-{uuid.uuid4().hex[:8]}:"
    try:
        async with deployed(deployment, bench_env(prefix)) as running, Api(running.api_url) as api:
            now = datetime.now(UTC).isoformat()
            await api.create_all(
                [
                    {"id": f"warm-{n}", "name": "warm", "command": "true", "scheduled_at": now}
                    for n in range(WARM_UP)
                ]
            )
            await wait_finished(prefix, WARM_UP, within=60)

            first_due = datetime.now(UTC) + timedelta(seconds=lead)
            due = {
                f"burst-{n:05}": first_due + timedelta(seconds=spread * n / tasks)
                for n in range(tasks)
            }
            await api.create_all(
                [
                    {"id": i, "name": i, "command": "true", "scheduled_at": at.isoformat()}
                    for i, at in due.items()
                ]
            )
            ahead = (first_due - datetime.now(UTC)).total_seconds()
            if ahead <= 0:
                raise SystemExit(f"creating took longer than --lead {lead:.1f} s: raise it")
            await wait_finished(prefix, WARM_UP + tasks, within=lead + spread + 300)
            runs = await api.runs_of(list(due))
    finally:
        await forget(prefix)
    lateness = [
        (datetime.fromisoformat(runs[i][0]["started_at"]) - at).total_seconds() * 1000
        for i, at in due.items()
    ]
    last = max(datetime.fromisoformat(runs[i][0]["finished_at"]) for i in due)
    failed = sum(1 for i in due if runs[i][0]["status"] != "completed")
    note = f"created {ahead:.1f} s before the first due; {failed} failed"
    return Lateness(label(deployment), lateness, (last - first_due).total_seconds(), note)


def celery_venv() -> Path:
    """The Celery venv's Python, made as ``../shared/peers/compare`` makes it if missing."""
    python = CELERY_VENV / "bin" / "python"
    if not (CELERY_VENV / "bin" / "celery").exists():
        subprocess.run(["python3", "-m", "venv", str(CELERY_VENV)], check=True)
        pip = str(CELERY_VENV / "bin" / "pip")
        subprocess.run([pip, "-q", "install", "celery", "redis", "anyio"], check=True)
    return python


async def celery_burst(tasks: int, spread: float, lead: float) -> Lateness:
    command = [
        str(celery_venv()),
        str(CELERY_SIDE),
        f"--tasks={tasks}",
        f"--spread={spread}",
        f"--lead={lead}",
    ]
    result = await anyio.run_process(command, stderr=sys.stderr)
    figures = json.loads(result.stdout.decode().strip().splitlines()[-1])
    note = (
        f"sent {figures['sent_before_first_due_s']:.1f} s before the first due, "
        f"{figures['sent_after_due']} after their due time; {figures['failed']} failed"
    )
    return Lateness(figures["label"], figures["lateness_ms"], figures["drained_s"], note)


async def main(deployments: list[str], tasks: int, spread: float, lead: float | None) -> None:
    ahead = planned_lead(tasks, lead)
    shape = "all at one instant" if spread == 0 else f"evenly over {spread:g} s"
    print(f"burst: {tasks} x `true` due {shape}, created {ahead:.1f} s before the first due")
    measured: list[Lateness] = []
    for deployment in deployments:
        started = time.monotonic()
        measured.append(await taskq_burst(deployment, tasks, spread, ahead))
        print(measured[-1].line() + f" [{time.monotonic() - started:.0f} s]", flush=True)
    started = time.monotonic()
    celery = await celery_burst(tasks, spread, ahead)
    print(celery.line() + f" [{time.monotonic() - started:.0f} s]", flush=True)
    for taskq in measured:
        print(
            f"{taskq.label} / {celery.label}: p50 {taskq.p(50) / celery.p(50):.2f}x, "
            f"p99 {taskq.p(99) / celery.p(99):.2f}x, "
            f"max {max(taskq.lateness_ms) / max(celery.lateness_ms):.2f}x "
            "(goal: p99 <= 1.00x, 0 early)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Lateness under a burst, taskq vs Celery")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="seconds the due times span")
    parser.add_argument("--lead", type=float, help="seconds between creating and the first due")
    parser.add_argument(
        "--taskq",
        "--taskq-args",
        dest="taskq",
        action="append",
        metavar="DEPLOYMENT",
        help=f"taskq processes, '+'-separated (repeatable; default {ONE_PROCESS!r} and {SPLIT!r})",
    )
    options = parser.parse_args()
    anyio.run(
        main, options.taskq or [ONE_PROCESS, SPLIT], options.tasks, options.spread, options.lead
    )

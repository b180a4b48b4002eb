"""What watching costs: compare's taskq workload with metrics, events and notifications,
and with them taken out of the same code, alternating, in one sitting.

    .venv/bin/python -m tests.bench.watching_cost [--rounds 6] [-n 2000] [--split-only]

Each round runs ``../shared/peers/taskq_bench.py`` (2,000 ``true`` tasks, each created due
now by one ``POST /tasks``, then 300 due one at a time over 10 s) through ``taskq serve``
and the split deployment (api+scheduler, 2 consumers), once as shipped ("watched") and
once "unwatched". The side that goes first alternates from round to round, so a machine
getting slower or faster over the sitting weighs on both alike.

"Unwatched" is this checkout with every watching hook replaced by a no-op in each of
its processes (a ``sitecustomize`` module on ``PYTHONPATH``, see ``_UNWATCH``): no
lifecycle events derived or written (``XADD``) in commits, no notification outbox
entries, no run, request, scheduler or consumer metrics, no sampled gauges. It is what
taskq would cost without those features, and nothing else differs: same revision, same
Redis and RabbitMQ, same client.

Printed: each run's line from ``taskq_bench.py``, then per deployment the throughput of
each side summed over the rounds, their ratio (the goal: watched >= 0.95x unwatched),
the median of the rounds' ratios, and lateness p99 of both sides.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT.parent / "shared" / "peers" / "taskq_bench.py"
TASKQ = ROOT / ".venv" / "bin" / "taskq"
REDIS_URL = "redis://127.0.0.1:6379/0"  # taskq_bench.py's default
WARM_UP_AND_LATENESS_TASKS = 100 + 300  # what taskq_bench.py runs besides -n

_UNWATCH = '''\
"""Loaded at start-up of every Python process of the "unwatched" side of
tests.bench.watching_cost: takes taskq's watching hooks out."""

import anyio

import app.consumer
import app.ports
import app.scheduler
import app.supervisor
import app.transactions


class _Quiet:
    def inc(self, amount=1):
        pass

    def dec(self, amount=1):
        pass

    def set(self, value):
        pass


def _count_nothing(transition):
    pass


async def _sample_nothing(store, broker, *, whole_service, task_status=anyio.TASK_STATUS_IGNORED):
    task_status.started()
    await anyio.sleep_forever()


app.ports.lifecycle_events = lambda transition: ()
app.ports.notifications_for = lambda transition: ()
for _module in (app.transactions, app.consumer, app.scheduler):
    _module.count_committed = _count_nothing
app.consumer.FREE_SLOTS = app.consumer.RUNNING_COMMANDS = _Quiet()
app.scheduler.CLAIMS = app.scheduler.DISPATCHES = app.scheduler.DEAD_LETTERS = _Quiet()
app.supervisor.sample = _sample_nothing
import app.api  # noqa: E402  (after the rest: it builds nothing at import)

app.api.RequestMetrics = lambda asgi_app: asgi_app
'''

_LINE = re.compile(r"throughput=(?P<tput>[\d.]+)/s .*p99=(?P<p99>[\d.]+)ms .*early=(?P<early>\d+)")


@dataclass
class Result:
    throughput: float
    p99: float
    early: int
    xadd_calls: int  # XADDs Redis ran meanwhile (events; live output, which `true` has none of)
    xadd_usec: int  # and the CPU they took in Redis, µs


def _xadds(client: redis.Redis) -> tuple[int, int]:
    stats = cast(dict[str, Any], client.info("commandstats")).get("cmdstat_xadd", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def _unwatched_taskq(directory: Path) -> Path:
    (directory / "sitecustomize.py").write_text(_UNWATCH)
    launcher = directory / "taskq"
    launcher.write_text(f'#!/bin/sh\nPYTHONPATH={directory} exec {TASKQ} "$@"\n')
    launcher.chmod(0o755)
    return launcher


def _check_unwatched(launcher: Path, directory: Path) -> None:
    """Fail loudly rather than measure a side whose patch did not load."""
    probe = "import app.ports; assert app.ports.lifecycle_events(None) == (), 'not patched'"
    env = {"PYTHONPATH": str(directory), "PATH": "/usr/bin:/bin"}
    subprocess.run([str(TASKQ.parent / "python"), "-c", probe], env=env, check=True)
    assert launcher.exists()


def _run(client: redis.Redis, taskq: Path, split: bool, tasks: int) -> Result:
    calls, usec = _xadds(client)
    command = [str(TASKQ.parent / "python"), str(BENCH), "--taskq", str(taskq), "-n", str(tasks)]
    if split:
        command.append("--split")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = out.strip().splitlines()[-1]
    print(f"    {line}", flush=True)
    match = _LINE.search(line)
    if match is None:
        sys.exit(f"unexpected line from taskq_bench.py: {line!r}")
    calls_after, usec_after = _xadds(client)
    return Result(
        float(match["tput"]),
        float(match["p99"]),
        int(match["early"]),
        calls_after - calls,
        usec_after - usec,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="What watching costs, in one sitting.")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("-n", "--tasks", type=int, default=2000)
    parser.add_argument("--split-only", action="store_true")
    parser.add_argument("--serve-only", action="store_true")
    args = parser.parse_args()
    deployments = [False, True]
    if args.split_only:
        deployments = [True]
    if args.serve_only:
        deployments = [False]
    client = redis.Redis.from_url(REDIS_URL)
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        unwatched = _unwatched_taskq(directory)
        _check_unwatched(unwatched, directory)
        sides = {"watched": TASKQ, "unwatched": unwatched}
        results: dict[tuple[bool, str], list[Result]] = {}
        for round_ in range(1, args.rounds + 1):
            order = ["watched", "unwatched"] if round_ % 2 else ["unwatched", "watched"]
            for split in deployments:
                for side in order:
                    name = "split 1+2" if split else "taskq serve"
                    print(f"round {round_}, {name}, {side}:", flush=True)
                    results.setdefault((split, side), []).append(
                        _run(client, sides[side], split, args.tasks)
                    )
    print()
    for split in deployments:
        watched, unwatched = results[(split, "watched")], results[(split, "unwatched")]
        total_w = sum(r.throughput for r in watched)
        total_u = sum(r.throughput for r in unwatched)
        ratios = [w.throughput / u.throughput for w, u in zip(watched, unwatched, strict=True)]
        name = "split 1+2" if split else "taskq serve"
        print(
            f"{name}: watched {total_w / len(watched):.0f}/s, unwatched "
            f"{total_u / len(unwatched):.0f}/s on average over {len(watched)} rounds: "
            f"{total_w / total_u:.3f}x (rounds: median {statistics.median(ratios):.3f}x, "
            f"{min(ratios):.2f}-{max(ratios):.2f}x); lateness p99 median "
            f"{statistics.median(r.p99 for r in watched):.1f} ms watched, "
            f"{statistics.median(r.p99 for r in unwatched):.1f} ms unwatched; early "
            f"{sum(r.early for r in watched)} / {sum(r.early for r in unwatched)}"
        )
        tasks = len(watched) * (args.tasks + WARM_UP_AND_LATENESS_TASKS)
        for side, runs in (("watched", watched), ("unwatched", unwatched)):
            calls, usec = sum(r.xadd_calls for r in runs), sum(r.xadd_usec for r in runs)
            print(
                f"  {side}: {calls / tasks:.2f} XADDs a task in Redis, "
                f"{usec / tasks:.1f} µs of Redis CPU a task for them"
            )


if __name__ == "__main__":
    main()

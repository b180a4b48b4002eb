"""Where the CPU goes per task, taskq against Celery, in one run.

    .venv/bin/python -m tests.bench.cpu_budget [-n 2000] \
        [--taskq "serve --roles api,scheduler + serve --roles consumer ..."]
    .venv/bin/python -m tests.bench.cpu_budget --versus DIR [--rounds 3] [-n 2000]

The workload is ``../shared/peers/compare``'s throughput phase: ``-n`` x ``true``, each
created due now by one request (taskq: ``POST /tasks``, aiohttp, 32 in flight; Celery:
``apply_async``), from the first request until every task completed, after 100 warm-up
tasks. It runs through ``taskq serve`` with default settings, then each extra ``--taskq``
deployment (``tests/bench/deployments``), then Celery prefork with 8 processes
(``tests/bench/celery_cpu.py``, a process of its own in the Celery venv).

For each, the CPU every process spent over the measured phase alone (``/proc/PID/stat``
deltas, in ms per task), by role: the client, each taskq process, the commands (the
``sh`` children a process has reaped: ``cutime + cstime``), the watchdogs, RabbitMQ,
Redis; then the total, the throughput that total allows on this machine's cores next to
the one measured, and taskq / Celery for each part both systems have. Long-lived children
(consumer processes, watchdogs, pool processes) are read directly: their CPU reaches their
parent's ``cutime`` only once they exit.

With ``--versus DIR`` it measures ``taskq serve`` of this checkout and of another one
(``DIR``, e.g. a ``git worktree`` of an older commit, served through ``PYTHONPATH`` with
this venv) alternately, and prints each run's parts and their means: what a change
costs per task, which swings far less with the machine's load than throughput does.

RabbitMQ and Redis serve the whole machine: their figures include whatever else ran
meanwhile, and "elsewhere" says how much CPU the rest of the machine used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import redis.asyncio as redis
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.bench.burst import celery_venv
from tests.bench.deployments import (
    ONE_PROCESS,
    Api,
    bench_env,
    deployed,
    forget,
    label,
    wait_finished,
)
from tests.bench.figures import (
    CLOCK_TICKS,
    CpuTicks,
    argv,
    cpu_ticks,
    family,
    machine_busy_ticks,
    named,
    parent_of,
)
from tests.conftest import REDIS_URL
from tests.processes import children

CELERY_SIDE = Path(__file__).with_name("celery_cpu.py")
CELERY_CONCURRENCY = 8
WARM_UP = 100
"""Tasks run before the measured phase, as ``../shared/peers/taskq_bench.py`` does."""

CLIENT = "client"
WORKERS = "scheduler+workers"
COMMANDS = "commands"
BROKER = "broker (RabbitMQ)"
STORE = "store (Redis)"
PARTS = (CLIENT, WORKERS, COMMANDS, BROKER, STORE)
"""What both systems have, compared part by part."""

WATCHDOGS = "watchdogs"
REAPED = "commands (sh, reaped)"


@dataclass(frozen=True)
class Share:
    """One process's CPU counted in a row of the table: its own, or (``reaped``) that of
    the children it has waited for."""

    row: str
    part: str
    pid: int
    reaped: bool = False


@dataclass(frozen=True)
class Member:
    """A process of a taskq deployment: its parent and command line."""

    parent: int
    argv: tuple[str, ...]


def is_watchdog(command: Sequence[str]) -> bool:
    """Whether ``command`` is a consumer's watchdog (``python -I .../process_groups.py``)."""
    return any(word.endswith("process_groups.py") for word in command)


def roles_of(command: Sequence[str]) -> list[str]:
    """The roles ``taskq serve`` plays with ``command`` (every role without ``--roles``)."""
    for n, word in enumerate(command):
        if word == "--roles" and n + 1 < len(command):
            return command[n + 1].split(",")
        if word.startswith("--roles="):
            return word.removeprefix("--roles=").split(",")
    return ["api", "scheduler", "consumer"]


def taskq_shares(tops: Sequence[int], members: Mapping[int, Member]) -> list[Share]:
    """The rows of a taskq deployment whose processes are ``tops`` (each a ``taskq
    serve`` command line) and ``members`` (them and their taskq descendants, watchdogs
    included, not the commands).

    A process with a watchdog child runs commands: it is a consumer, and its reaped
    children are the commands. A top process without one has handed its consumer role to
    consumer processes of its own (or never had it), and is named by the roles it keeps.
    """
    kids: dict[int, list[int]] = {}
    for pid, member in members.items():
        kids.setdefault(member.parent, []).append(pid)
    shares: list[Share] = []
    consumers = 0

    def visit(pid: int) -> None:
        nonlocal consumers
        command = members[pid].argv
        if is_watchdog(command):
            shares.append(Share(WATCHDOGS, WORKERS, pid))
            return
        runs_commands = any(is_watchdog(members[kid].argv) for kid in kids.get(pid, []))
        if pid in tops:
            kept = [role for role in roles_of(command) if runs_commands or role != "consumer"]
            row = "+".join(kept) if kept else "consumer"
            if any(not is_watchdog(members[kid].argv) for kid in kids.get(pid, [])):
                row += " (parent of consumers)"
        else:
            consumers += 1
            row = f"consumer {consumers}"
        shares.append(Share(f"{row} (own)" if runs_commands else row, WORKERS, pid))
        if runs_commands:
            shares.append(Share(REAPED, COMMANDS, pid, reaped=True))
        for kid in sorted(kids.get(pid, [])):
            visit(kid)

    for top in tops:
        visit(top)
    return shares


def celery_shares(client: int, worker: int, pool: Sequence[int]) -> list[Share]:
    """The rows of a prefork Celery worker and the process calling ``apply_async``."""
    pool_row = f"pool children ({len(pool)}, own)"
    return [
        Share(CLIENT, CLIENT, client),
        Share("worker main", WORKERS, worker),
        *(Share(pool_row, WORKERS, pid) for pid in pool),
        *(Share(REAPED, COMMANDS, pid, reaped=True) for pid in pool),
    ]


def server_shares() -> list[Share]:
    """RabbitMQ's and Redis's processes, shared with the whole machine."""
    return [
        *(Share("RabbitMQ (beam.smp)", BROKER, pid) for pid in named("beam.smp")),
        *(Share("Redis (redis-server)", STORE, pid) for pid in named("redis-server")),
    ]


def taskq_members(tops: Sequence[int]) -> dict[int, Member]:
    """Each of ``tops`` and its taskq descendants, read from /proc."""
    return {
        pid: Member(parent=parent_of(pid), argv=argv(pid)) for top in tops for pid in family(top)
    }


@dataclass(frozen=True)
class Snapshot:
    """CPU time so far of the measured processes and of the machine, at ``at``."""

    at: float
    machine_busy: int
    processes: dict[int, CpuTicks | None]


def snapshot(shares: Sequence[Share]) -> Snapshot:
    """The CPU time so far of every process in ``shares`` and of the whole machine."""
    return Snapshot(
        at=time.monotonic(),
        machine_busy=machine_busy_ticks(),
        processes={share.pid: cpu_ticks(share.pid) for share in shares},
    )


@dataclass(frozen=True)
class Row:
    """A line of the table: a role, the processes playing it, their CPU per task."""

    name: str
    part: str
    pids: list[int]
    ms_per_task: float


@dataclass
class Budget:
    """Where the CPU of one system went, per task, over its measured phase."""

    label: str
    tasks: int
    elapsed_s: float
    rows: list[Row]
    elsewhere_ms: float
    """CPU the rest of the machine used meanwhile, per task (other helpers, the kernel)."""
    cores: int
    notes: list[str] = field(default_factory=list[str])

    @property
    def throughput(self) -> float:
        return self.tasks / self.elapsed_s

    @property
    def total_ms(self) -> float:
        return sum(row.ms_per_task for row in self.rows)

    @property
    def ceiling(self) -> float:
        """Tasks a second this machine's cores allow at this CPU cost a task."""
        return self.cores * 1000 / self.total_ms

    def part_ms(self, part: str) -> float:
        return sum(row.ms_per_task for row in self.rows if row.part == part)


def budget(
    system: str,
    tasks: int,
    elapsed_s: float,
    shares: Sequence[Share],
    before: Snapshot,
    after: Snapshot,
    cores: int,
) -> Budget:
    """``shares`` turned into rows of CPU ms per task between two snapshots."""
    rows: dict[str, Row] = {}
    notes: list[str] = []
    measured = 0
    for share in shares:
        start, end = before.processes.get(share.pid), after.processes.get(share.pid)
        if start is None or end is None or start.started != end.started:
            notes.append(f"{share.row}: process {share.pid} did not live through the phase")
            continue
        ticks = end.reaped - start.reaped if share.reaped else end.own - start.own
        measured += ticks
        row = rows.get(share.row) or Row(share.row, share.part, [], 0.0)
        rows[share.row] = Row(
            row.name,
            row.part,
            [*row.pids, share.pid],
            row.ms_per_task + _ms_per_task(ticks, tasks),
        )
    elsewhere = after.machine_busy - before.machine_busy - measured
    ordered = sorted(rows.values(), key=lambda row: (PARTS.index(row.part), row.name == WATCHDOGS))
    return Budget(system, tasks, elapsed_s, ordered, _ms_per_task(elsewhere, tasks), cores, notes)


def _ms_per_task(ticks: int, tasks: int) -> float:
    return ticks * 1000 / CLOCK_TICKS / tasks


def table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the others (figures)
    right-aligned."""
    widths = [max(len(line[n]) for line in [header, *lines]) for n in range(len(header))]

    def render(line: Sequence[str]) -> str:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    return [render(header), *(render(line) for line in lines)]


def _pids(pids: Sequence[int]) -> str:
    return " ".join(map(str, pids)) if len(pids) <= 2 else f"{len(pids)} processes"


def report(measured: Budget) -> list[str]:
    """One system's table: a row per role, the total, and what it implies."""
    lines = [
        [row.name, row.part, _pids(row.pids), f"{row.ms_per_task:.3f}"] for row in measured.rows
    ]
    lines.append(["total", "", "", f"{measured.total_ms:.3f}"])
    lines.append(["(elsewhere on the machine)", "", "", f"{measured.elsewhere_ms:.3f}"])
    header = ["role", "part", "processes", "ms/task"]
    return [
        f"{measured.label}: {measured.tasks} tasks in {measured.elapsed_s:.2f} s = "
        f"{measured.throughput:.0f}/s; CPU ceiling {measured.cores} x 1000 / "
        f"{measured.total_ms:.2f} ms = {measured.ceiling:.0f}/s; meanwhile the rest of the "
        f"machine used {measured.elsewhere_ms * measured.throughput / 10:.0f} % of a core",
        *("  " + line for line in table(header, lines)),
        *(f"  note: {note}" for note in measured.notes),
    ]


def comparison(taskqs: Sequence[Budget], celery: Budget) -> list[str]:
    """CPU ms per task of each part both systems have, side by side, and taskq / Celery."""
    numbers = [f"#{n + 1}" for n in range(len(taskqs))]
    header = ["ms/task", *numbers, "celery", *(f"{number} / celery" for number in numbers)]
    lines: list[list[str]] = []

    def line(name: str, figure: Callable[[Budget], float], digits: int = 3) -> None:
        values = [figure(b) for b in [*taskqs, celery]]
        ratios = [f"{value / values[-1]:.2f}x" if values[-1] else "-" for value in values[:-1]]
        lines.append([name, *(f"{value:.{digits}f}" for value in values), *ratios])

    for part in PARTS:
        line(part, lambda b, part=part: b.part_ms(part))
    line("total", lambda b: b.total_ms)
    line("ceiling /s", lambda b: b.ceiling, 0)
    line("measured /s", lambda b: b.throughput, 0)
    line("(elsewhere)", lambda b: b.elsewhere_ms)
    legend = [f"{number} = {b.label}" for number, b in zip(numbers, taskqs, strict=True)]
    return [*table(header, lines), f"  ({'; '.join(legend)}; celery = {celery.label})"]


def cores() -> int:
    return len(os.sched_getaffinity(0))


async def taskq_budget(deployment: str, tasks: int, *, source: Path | None = None) -> Budget:
    """``deployment``'s CPU per task; with ``source``, serving that checkout's ``app`` and
    ``cli`` (``PYTHONPATH``) with this venv."""
    prefix = f"taskq-cpu-{uuid.uuid4().hex[:8]}:"
    env = bench_env(prefix)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    try:
        async with deployed(deployment, env) as running, Api(running.api_url) as api:
            await api.create_all(_due_now("warm", WARM_UP))
            await wait_finished(prefix, WARM_UP, within=120)
            bodies = _due_now("task", tasks)
            shares = [
                Share(f"{CLIENT} (this process)", CLIENT, os.getpid()),
                *taskq_shares(running.pids, taskq_members(running.pids)),
                *server_shares(),
            ]
            before = snapshot(shares)
            await api.create_all(bodies)
            await wait_finished(prefix, WARM_UP + tasks, within=600)
            after = snapshot(shares)
            failed = await _failed(prefix)
    finally:
        await forget(prefix)
    measured = budget(
        label(deployment), tasks, after.at - before.at, shares, before, after, cores()
    )
    if failed:
        measured.notes.append(f"{failed} tasks failed")
    return measured


def _due_now(name: str, count: int) -> list[dict[str, str]]:
    now = datetime.now(UTC).isoformat()
    return [
        {"id": f"{name}-{n:05}", "name": name, "command": "true", "scheduled_at": now}
        for n in range(count)
    ]


async def _failed(prefix: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return await client.zcard(f"{prefix}status:failed")
    finally:
        await client.aclose()


async def celery_budget(tasks: int) -> Budget:
    command = [str(celery_venv()), str(CELERY_SIDE), f"--tasks={tasks}", f"--warmup={WARM_UP}"]
    async with await anyio.open_process(command, stderr=sys.stderr) as side:
        assert side.stdin is not None and side.stdout is not None
        said = BufferedByteReceiveStream(side.stdout)
        worker = (await _hear(said, side))["worker"]
        shares = [
            *celery_shares(side.pid, worker, children(worker)),
            *server_shares(),
        ]
        before = snapshot(shares)
        await side.stdin.send(b"go\n")
        figures = await _hear(said, side)
        after = snapshot(shares)
        await side.stdin.send(b"stop\n")
        if await side.wait():
            raise SystemExit(f"the Celery side exited with {side.returncode}")
    measured = budget(
        f"celery prefork c={CELERY_CONCURRENCY}",
        tasks,
        figures["elapsed_s"],
        shares,
        before,
        after,
        cores(),
    )
    if figures["failed"]:
        measured.notes.append(f"{figures['failed']} tasks failed")
    return measured


async def _hear(said: BufferedByteReceiveStream, side: Process) -> dict[str, int]:
    """The Celery side's next JSON line."""
    with anyio.fail_after(600):
        try:
            return json.loads(await said.receive_until(b"\n", 65536))
        except anyio.IncompleteRead:
            raise SystemExit(f"the Celery side exited with {await side.wait()}") from None


async def main(extra: Sequence[str], tasks: int) -> None:
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"cpu budget: {tasks} x `true`, each created due now by one request "
        f"({WARM_UP} warm-up first); {cores()} cores; load average {load}"
    )
    taskqs: list[Budget] = []
    for deployment in [ONE_PROCESS, *extra]:
        taskqs.append(await taskq_budget(deployment, tasks))
        print("\n".join(report(taskqs[-1])), flush=True)
    celery = await celery_budget(tasks)
    print("\n".join(report(celery)), flush=True)
    print("\n".join(comparison(taskqs, celery)))


async def versus(other: Path, tasks: int, rounds: int) -> None:
    """``taskq serve`` of this checkout and of ``other``, alternating (which goes first
    too), ``rounds`` times: what a change costs or saves per task, in one sitting."""
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"cpu budget: {tasks} x `true`, this checkout vs {other}; load average {load}")
    sides: dict[str, list[Budget]] = {"this": [], "other": []}
    for round_ in range(rounds):
        order = ["this", "other"] if round_ % 2 == 0 else ["other", "this"]
        for side in order:
            source = other if side == "other" else None
            measured = await taskq_budget(ONE_PROCESS, tasks, source=source)
            sides[side].append(measured)
            parts = " ".join(f"{part} {measured.part_ms(part):.3f}" for part in PARTS)
            print(
                f"round {round_ + 1}, {side:5}: total {measured.total_ms:.3f} ms/task "
                f"({parts}); {measured.throughput:.0f}/s",
                flush=True,
            )
    this, that = sides["this"], sides["other"]
    for part, figure in [
        *((part, lambda b, part=part: b.part_ms(part)) for part in PARTS),
        ("total", lambda b: b.total_ms),
    ]:
        mine = sum(figure(b) for b in this) / rounds
        theirs = sum(figure(b) for b in that) / rounds
        ratio = f"{mine / theirs:.3f}x" if theirs else "-"
        print(f"  {part:18} this {mine:.3f}  other {theirs:.3f} ms/task  this/other {ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="CPU per task by process, taskq vs Celery")
    parser.add_argument("-n", "--tasks", type=int, default=2000)
    parser.add_argument(
        "--taskq",
        "--taskq-args",
        dest="taskq",
        action="append",
        default=[],
        metavar="DEPLOYMENT",
        help=f"an extra taskq deployment, '+'-separated processes (after {ONE_PROCESS!r})",
    )
    parser.add_argument(
        "--versus",
        type=Path,
        metavar="DIR",
        help="instead: taskq serve of this checkout against DIR's (another checkout), no Celery",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --versus: alternations")
    options = parser.parse_args()
    if options.versus is not None:
        anyio.run(versus, options.versus.resolve(), options.tasks, options.rounds)
    else:
        anyio.run(main, options.taskq, options.tasks)

"""What Python's cyclic garbage collector costs each process of ``taskq serve``.

    .venv/bin/python -m tests.bench.collector_cost [-n 2000] [--versus DIR]

Starts ``taskq serve`` (default settings: an api+scheduler process and its consumer
processes) with a ``sitecustomize`` module on ``PYTHONPATH`` that times every collection
through ``gc.callbacks`` (thread CPU time), runs ``-n`` tasks of ``true`` through it,
each created due now by one ``POST /tasks`` (after 100 warm-up tasks), and prints for
each process the CPU it spent over the measured phase, the part of it the collector
took, the collections of each generation and the collector's settings.

``--versus DIR`` measures another checkout too (``DIR``'s ``app`` and ``cli`` through
``PYTHONPATH``, this venv), e.g. one from before a change to the collector's settings.
Unlike throughput or a whole CPU budget, the collector's own share hardly moves with
the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio

from tests.bench.deployments import Api, bench_env, deployed, forget, wait_finished
from tests.conftest import eventually

WARM_UP = 100

_TIMER = '''\
"""Loaded at start-up of each Python process of tests.bench.collector_cost's taskq:
times the garbage collector, and writes what it counted to a file on request."""

import gc
import json
import os
import signal
import time

_totals = {"seconds": 0.0, "collections": [0, 0, 0]}
_started = [0.0]


def _timed(phase, info):
    if phase == "start":
        _started[0] = time.thread_time()
    else:
        _totals["seconds"] += time.thread_time() - _started[0]
        _totals["collections"][info["generation"]] += 1


def _report(signum, frame):
    figures = {
        **_totals,
        "cpu": time.process_time(),
        "thresholds": gc.get_threshold(),
        "frozen": gc.get_freeze_count(),
    }
    path = os.path.join(os.environ["COLLECTOR_COST_DIR"], f"{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump(figures, out)


gc.callbacks.append(_timed)
signal.signal(signal.SIGUSR2, _report)
'''


@dataclass
class Figures:
    cpu: float
    seconds: float
    collections: list[int]
    thresholds: list[int]
    frozen: int


async def _read(directory: Path, pids: list[int]) -> dict[int, Figures]:
    """Each process's figures: asked for with SIGUSR2, written to ``directory``."""
    _reports(directory, remove=True)
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    await eventually(lambda: len(_reports(directory)) == len(pids))
    return {int(path.stem): Figures(**json.loads(path.read_text())) for path in _reports(directory)}


def _reports(directory: Path, *, remove: bool = False) -> list[Path]:
    found = list(directory.glob("*.json"))
    for path in found if remove else ():
        path.unlink()
    return found


def _python_processes(pids: list[int]) -> list[int]:
    """The deployment's taskq processes and their consumer processes (not the
    watchdogs, which are not Python, nor the commands)."""
    found: list[int] = []
    for pid in pids:
        found.append(pid)
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in map(int, children):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"python" in cmdline or b"taskq" in cmdline:
                found.append(child)
    return found


async def measure(tasks: int, source: Path | None) -> None:
    prefix = f"taskq-gc-{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        (directory / "sitecustomize.py").write_text(_TIMER)
        env = bench_env(prefix)
        env["PYTHONPATH"] = ":".join([str(directory), *([str(source)] if source else [])])
        env["COLLECTOR_COST_DIR"] = str(directory)
        now = datetime.now(UTC).isoformat()
        bodies = [
            {"id": f"{name}-{n:05}", "name": name, "command": "true", "scheduled_at": now}
            for name, count in (("warm", WARM_UP), ("task", tasks))
            for n in range(count)
        ]
        try:
            async with deployed("serve", env) as running, Api(running.api_url) as api:
                await api.create_all(bodies[:WARM_UP])
                await wait_finished(prefix, WARM_UP, within=120)
                pids = _python_processes(running.pids)
                before = await _read(directory, pids)
                await api.create_all(bodies[WARM_UP:])
                await wait_finished(prefix, WARM_UP + tasks, within=600)
                after = await _read(directory, pids)
        finally:
            await forget(prefix)
    print(f"{source or 'this checkout'}: taskq serve, {tasks} tasks")
    total_cpu = total_gc = 0.0
    for pid in pids:
        b, a = before[pid], after[pid]
        cpu, spent = a.cpu - b.cpu, a.seconds - b.seconds
        total_cpu, total_gc = total_cpu + cpu, total_gc + spent
        counts = [x - y for x, y in zip(a.collections, b.collections, strict=True)]
        role = "api+scheduler" if pid == pids[0] else "consumer"
        print(
            f"  {role:13} {pid:>7}: CPU {cpu * 1000 / tasks:.3f} ms/task, collector "
            f"{spent * 1000 / tasks:.3f} ms/task ({100 * spent / cpu:.1f} %); collections "
            f"by generation {counts}; thresholds {tuple(a.thresholds)}, {a.frozen} frozen"
        )
    print(
        f"  all: collector {total_gc * 1000 / tasks:.3f} of {total_cpu * 1000 / tasks:.3f} "
        f"ms/task ({100 * total_gc / total_cpu:.1f} %)"
    )


async def main(tasks: int, versus: Path | None) -> None:
    await measure(tasks, None)
    if versus is not None:
        await measure(tasks, versus)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="What the garbage collector costs taskq")
    parser.add_argument("-n", "--tasks", type=int, default=2000)
    parser.add_argument("--versus", type=Path, metavar="DIR", help="another checkout, too")
    options = parser.parse_args()
    versus = None if options.versus is None else options.versus.resolve()
    anyio.run(main, options.tasks, versus)

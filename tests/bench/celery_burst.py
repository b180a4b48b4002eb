"""The Celery side of ``tests.bench.burst``: run with the Celery venv's Python, not taskq's.

    /tmp/celery-venv/bin/python tests/bench/celery_burst.py --tasks 1000 --spread 1 --lead 5

Uses the peer benchmark's Celery app and worker control from ``../shared/peers/celery``
(``tasks.py``: ``sh -c CMD`` through ``subprocess.run``, acks_late, prefetch 1, results in
Redis; ``bench.py``: readiness ping and warm shutdown) unchanged, with one difference: a
queue of its own (``-Q``), so that it can neither take nor purge anyone else's messages on
the shared broker. Sends every task with an ETA before the first one is due, then prints
one JSON line: ``{"label", "lateness_ms", "drained_s", "sent_after_due",
"sent_before_first_due_s", "failed"}``, lateness being the task's ``started`` (taken just
before the spawn) minus its ETA, ``drained_s`` the last one's end minus the first ETA.
"""
# pyright: reportMissingImports=false, reportMissingModuleSource=false

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

PEERS = os.environ.get("TASKQ_PEERS_CELERY", "/work/shared/peers/celery")
sys.path.insert(0, PEERS)

from celery.result import ResultSet  # noqa: E402

# The peer benchmark's modules, by name from PEERS (``bench`` would also name tests/bench).
peer_bench = importlib.import_module("bench")
peer_tasks = importlib.import_module("tasks")
app, run = peer_tasks.app, peer_tasks.run


def start_worker(
    queue: str, concurrency: int, nodename: str, log_path: str
) -> subprocess.Popen[bytes]:
    """A prefork worker as ``bench.py`` starts one, consuming ``queue`` only."""
    command = [
        sys.executable, "-m", "celery", "-A", "tasks", "worker",
        "--pool", "prefork", "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
        "-Q", queue, "-n", nodename, "--loglevel", "WARNING",
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=PEERS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command, cwd=PEERS, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


@contextmanager
def warm_worker(concurrency: int, warmup: int) -> Iterator[tuple[str, int, list[str]]]:
    """A prefork worker on a queue of its own, warmed up with ``warmup`` runs: yields the
    queue, the worker's pid and the list of result ids to forget (append to it); stops
    the worker and deletes its queue and results on exit."""
    queue = f"taskq-bench-celery-{uuid.uuid4().hex[:8]}"
    nodename = f"{queue}@{os.uname().nodename}"
    log_path = os.path.join(tempfile.gettempdir(), f"{queue}.log")
    worker = start_worker(queue, concurrency, nodename, log_path)
    ids: list[str] = []
    try:
        peer_bench.wait_ready(worker, nodename)
        warm = [run.apply_async(("true",), queue=queue) for _ in range(warmup)]
        ids.extend(result.id for result in warm)
        ResultSet(warm).join_native(timeout=120)
        yield queue, worker.pid, ids
    finally:
        peer_bench.stop_worker(worker)
        forget(queue, ids)
    os.unlink(log_path)


def burst(queue: str, tasks: int, spread: float, lead: float, ids: list[str]) -> dict[str, object]:
    """``tasks`` x ``true`` due evenly over ``spread`` s from ``lead`` s from now."""
    first_due = time.time() + lead
    due = [first_due + spread * n / tasks for n in range(tasks)]
    results = []
    for eta in due:
        when = dt.datetime.fromtimestamp(eta, tz=dt.UTC)
        results.append(run.apply_async(("true",), eta=when, queue=queue))
    sent = time.time()
    ids.extend(result.id for result in results)
    values = ResultSet(results).join_native(timeout=lead + spread + 300, propagate=True)
    return {
        "lateness_ms": [
            1000 * (value["started"] - eta) for value, eta in zip(values, due, strict=True)
        ],
        "drained_s": max(value["started"] + value["duration"] for value in values) - first_due,
        "sent_after_due": sum(1 for eta in due if eta < sent),
        "sent_before_first_due_s": first_due - sent,
        "failed": sum(1 for value in values if value["exit_code"] != 0),
    }


def forget(queue: str, ids: list[str]) -> None:
    """Delete the private queue and the result keys this run made."""
    with app.connection_for_write() as connection:
        connection.default_channel.queue_delete(queue)
    client = app.backend.client
    for start in range(0, len(ids), 1000):
        client.delete(*(app.backend.get_key_for_task(i) for i in ids[start : start + 1000]))


def main() -> None:
    parser = argparse.ArgumentParser(description="Celery's lateness under a burst")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--lead", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=32)
    options = parser.parse_args()

    with warm_worker(options.concurrency, options.warmup) as (queue, _, ids):
        figures = burst(queue, options.tasks, options.spread, options.lead, ids)
    label = f"celery prefork c={options.concurrency}"
    print(json.dumps({"label": label, **figures}), flush=True)


if __name__ == "__main__":
    main()

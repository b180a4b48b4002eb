"""The Celery side of ``tests.bench.cpu_budget``: run with the Celery venv's Python, as a
process of its own, so that the CPU ``apply_async`` and the result wait spend is measured
apart from the process measuring it.

    /tmp/celery-venv/bin/python tests/bench/celery_cpu.py --tasks 2000

Starts a prefork worker on a queue of its own (``celery_burst.start_worker``: the peer
benchmark's app and worker settings), warms it up, then talks to its parent over
stdin/stdout, one JSON line each way, so that the parent reads /proc just before and just
after the measured phase:

1. prints ``{"worker": PID}`` once warm, and waits for a line on stdin;
2. runs compare's throughput phase (``--tasks`` x ``true`` through ``apply_async``, due
   now, until the client holds every result) and prints ``{"elapsed_s", "failed"}``;
3. waits for a line on stdin, then stops the worker and deletes its queue and results.
"""
# pyright: reportMissingImports=false, reportMissingModuleSource=false

from __future__ import annotations

import argparse
import json
import sys
import time

from celery.result import ResultSet
from celery_burst import run, warm_worker


def tell(message: dict[str, object]) -> None:
    """One JSON line to the parent."""
    print(json.dumps(message), flush=True)


def throughput(queue: str, tasks: int, ids: list[str]) -> dict[str, object]:
    """``tasks`` x ``true`` sent due now, from the first send until every result is in."""
    started = time.monotonic()
    results = [run.apply_async(("true",), queue=queue) for _ in range(tasks)]
    ids.extend(result.id for result in results)
    values = ResultSet(results).join_native(timeout=600, propagate=True)
    return {
        "elapsed_s": time.monotonic() - started,
        "failed": sum(1 for value in values if value["exit_code"] != 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Celery's throughput phase, paced by stdin")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=100)
    options = parser.parse_args()

    with warm_worker(options.concurrency, options.warmup) as (queue, worker, ids):
        tell({"worker": worker})
        sys.stdin.readline()
        tell(throughput(queue, options.tasks, ids))
        sys.stdin.readline()


if __name__ == "__main__":
    main()

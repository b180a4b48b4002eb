"""Commands per second through ``run_command``, with and without the watchdog.

    .venv/bin/python -m tests.bench.spawn_rate [-n 2000] [--repeat 3]

Each mode runs ``/bin/sh -c true`` ``n`` times at concurrency 1 and 8 and prints the
median rate: what registering every process group with the watchdog costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import AsyncExitStack

import anyio

from app.executor import CappedOutput, run_command
from app.watchdog import watching_commands

ARGV = ["/bin/sh", "-c", "true"]


async def rate(count: int, concurrency: int, *, watched: bool) -> float:
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            outcome = await run_command(
                ARGV,
                env={},
                cwd=None,
                time_limit=None,
                output=CappedOutput(1024),
                watchdog=watchdog,
            )
            assert outcome.exit_code == 0, outcome

    async with AsyncExitStack() as stack:
        watchdog = await stack.enter_async_context(watching_commands()) if watched else None
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return count / (time.perf_counter() - started)


async def main(count: int, repeat: int) -> None:
    for concurrency in (1, 8):
        rates: dict[bool, list[float]] = {False: [], True: []}
        # Interleaved, so that the load of the machine weighs on both alike.
        for _ in range(repeat):
            for watched in (False, True):
                rates[watched].append(await rate(count, concurrency, watched=watched))
        for watched, measured in rates.items():
            label = "with watchdog" if watched else "without      "
            print(
                f"c={concurrency} {label}: {statistics.median(measured):5.0f} spawns/s"
                f"  (runs: {', '.join(f'{r:.0f}' for r in measured)})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    anyio.run(main, options.n, options.repeat)

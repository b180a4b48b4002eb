"""Commands per second through ``run_command``, and the consumer's CPU per command: each
way of starting and awaiting them (through a pidfd, and AnyIO's process API, the
fallback), with and without the watchdog, side by side in one run.

    .venv/bin/python -m tests.bench.spawn_rate [-n 1000] [--repeat 3] [--backend asyncio]

Each mode runs ``/bin/sh -c true`` ``n`` times at concurrency 1 and 8, interleaved with
the others so that the load of the machine weighs on all alike, and prints the median
rate and parent CPU (this process only: the commands and the watchdog are apart), then
the ratio pidfd / AnyIO. The process imports the whole service first, so that it is as
big as a consumer (spawning costs more in a bigger process).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from contextlib import AsyncExitStack
from typing import NamedTuple

import anyio
import sniffio

from app import executor
from app.executor import CappedOutput, run_command
from app.supervisor import _watch_children_with_pidfd  # pyright: ignore[reportPrivateUsage]
from app.watchdog import Watchdog, watching_commands

ARGV = ["/bin/sh", "-c", "true"]
WAYS = {"anyio": False, "pidfd": True}
"""Each way, by the value of ``executor.WAIT_THROUGH_PIDFD`` that selects it."""
CONCURRENCIES = (1, 8)


class Measure(NamedTuple):
    rate: float
    """Commands per second."""
    cpu_ms: float
    """CPU of this process (user + system) per command, in milliseconds."""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_true(count: int, concurrency: int, watchdog: Watchdog | None = None) -> None:
    """``sh -c true`` ``count`` times through ``run_command``, ``concurrency`` at once."""
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
            if outcome.exit_code != 0:
                raise SystemExit(f"`true` failed: {outcome}")

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


async def measure(count: int, concurrency: int, watchdog: Watchdog | None) -> Measure:
    started, cpu_started = time.perf_counter(), cpu_seconds()
    await run_true(count, concurrency, watchdog)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return Measure(count / elapsed, 1000 * cpu / count)


async def measure_way(way: str, count: int, concurrency: int, *, watched: bool) -> Measure:
    chosen = executor.WAIT_THROUGH_PIDFD
    executor.WAIT_THROUGH_PIDFD = WAYS[way]
    try:
        async with AsyncExitStack() as stack:
            watchdog = await stack.enter_async_context(watching_commands()) if watched else None
            return await measure(count, concurrency, watchdog)
    finally:
        executor.WAIT_THROUGH_PIDFD = chosen


def median(measures: list[Measure]) -> Measure:
    return Measure(
        statistics.median(m.rate for m in measures), statistics.median(m.cpu_ms for m in measures)
    )


def report(results: dict[tuple[str, bool, int], list[Measure]], watched: bool) -> None:
    print(f"\n{'with' if watched else 'without'} the watchdog")
    header = "".join(f"  c={c}: spawns/s  CPU ms/spawn" for c in CONCURRENCIES)
    print(f"{'':12}{header}")
    medians = {(way, c): median(results[way, watched, c]) for way in WAYS for c in CONCURRENCIES}
    for way in WAYS:
        cells = "".join(
            f"  {medians[way, c].rate:13.0f}  {medians[way, c].cpu_ms:12.3f}" for c in CONCURRENCIES
        )
        print(f"{way:12}{cells}")
    ratios = "".join(
        f"  {medians['pidfd', c].rate / medians['anyio', c].rate:12.2f}x"
        f"  {medians['pidfd', c].cpu_ms / medians['anyio', c].cpu_ms:11.2f}x"
        for c in CONCURRENCIES
    )
    print(f"{'pidfd/anyio':12}{ratios}")
    for way in WAYS:
        runs = "; ".join(
            f"c={c} "
            + ", ".join(f"{m.rate:.0f}/s {m.cpu_ms:.3f} ms" for m in results[way, watched, c])
            for c in CONCURRENCIES
        )
        print(f"  {way} runs: {runs}")


async def main(count: int, repeat: int) -> None:
    if sniffio.current_async_library() == "asyncio":
        _watch_children_with_pidfd()  # as the service does, for AnyIO's way on asyncio
    if not executor.WAIT_THROUGH_PIDFD:
        raise SystemExit("this kernel has no pidfd: there is only one way to measure")
    for way in WAYS:  # first runs pay for imports and caches: not measured
        await measure_way(way, 50, 1, watched=False)
    results: dict[tuple[str, bool, int], list[Measure]] = {}
    for _ in range(repeat):
        for watched in (False, True):
            for concurrency in CONCURRENCIES:
                for way in WAYS:
                    measured = await measure_way(way, count, concurrency, watched=watched)
                    results.setdefault((way, watched, concurrency), []).append(measured)
    print(f"/bin/sh -c true, {count} per run, median of {repeat} runs")
    for watched in (False, True):
        report(results, watched)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    options = parser.parse_args()
    anyio.run(main, options.n, options.repeat, backend=options.backend)

"""What acknowledged writes cost: commits through Sentinel with and without
``min_replicas=1`` (``WAIT 1`` pipelined with each commit), and straight to the primary.

    .venv/bin/python -m tests.bench.sentinel_wait [--commits 2000] [--batch 50] [--rounds 3]

A throwaway primary with one replica and three Sentinels (``tests/e2e/sentinels.py``) on
this machine; each round runs every store in turn (alternating, as timings drift):
``--commits`` sequential single commits (``TaskStore.commit``, a task created each; p50
and p99 latency and commits/s), then as many in batches of ``--batch``
(``commit_each``, how the consumer and scheduler commit; commits/s). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import anyio

from app.adapters import open_store
from app.ports import TaskChange
from tests.bench.figures import percentile
from tests.contract.stores import make_task
from tests.e2e.sentinels import throwaway_sentinels


async def singles(url: str, commits: int) -> tuple[float, float, float]:
    """p50 and p99 latency (ms) of ``commits`` sequential commits, and commits/s."""
    latencies: list[float] = []
    async with open_store(url, prefix=f"bench-{uuid.uuid4().hex[:8]}:") as store:
        began = anyio.current_time()
        for number in range(commits):
            started = anyio.current_time()
            await store.commit(TaskChange(f"t{number}", None, make_task(f"t{number}")))
            latencies.append(anyio.current_time() - started)
        took = anyio.current_time() - began
    return percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000, commits / took


async def batches(url: str, commits: int, batch: int) -> float:
    """Commits/s of ``commits`` commits sent ``batch`` at a time (``commit_each``)."""
    async with open_store(url, prefix=f"bench-{uuid.uuid4().hex[:8]}:") as store:
        began = anyio.current_time()
        for start in range(0, commits, batch):
            ids = [f"t{number}" for number in range(start, min(commits, start + batch))]
            await store.commit_each([TaskChange(i, None, make_task(i)) for i in ids])
        return commits / (anyio.current_time() - began)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="taskq-bench-sentinel-") as base:
        async with throwaway_sentinels(Path(base)) as sentinels:
            primary = await sentinels.primary()
            urls = {
                "straight to the primary": primary.url,
                "through Sentinel": sentinels.url(),
                "through Sentinel, min_replicas=1": sentinels.url(query="min_replicas=1"),
            }
            for round_number in range(1, options.rounds + 1):
                for name, url in urls.items():
                    p50, p99, rate = await singles(url, options.commits)
                    batched = await batches(url, options.commits, options.batch)
                    print(
                        f"round {round_number}, {name}: single commits p50 {p50:.3f} ms, "
                        f"p99 {p99:.3f} ms, {rate:,.0f}/s; in batches of {options.batch}: "
                        f"{batched:,.0f}/s",
                        flush=True,
                    )


if __name__ == "__main__":
    anyio.run(main)

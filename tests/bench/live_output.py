"""How late live output reaches followers of ``GET .../output?follow=true``.

Run on demand (needs Redis and RabbitMQ, like the tests):

    .venv/bin/python -m tests.bench.live_output [--lines 40] [--followers 1]

A command prints its clock (``date +%s.%N``) every 100 ms; each follower notes when each
line arrives. It prints, measured in the same run:
- baseline: the same command read straight from its pipe in this process (what any
  follower of a local process gets);
- live: the same lines through ``taskq serve`` (consumer -> Redis stream -> API -> SSE),
  for ``--followers`` followers at once: p50 / p99 / max delay, and the delay as a
  multiple of the consumer's batching interval (``FLUSH_SECONDS``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import uuid

import anyio
import httpx

from app.adapters.amqp_broker import delete_amqp_layout
from app.live_output import FLUSH_SECONDS
from tests.conftest import AMQP_URL, delete_keys
from tests.e2e.harness import running, service_env


def printing_clock(lines: int) -> str:
    return f"for i in $(seq {lines}); do date +%s.%N; sleep 0.1; done"


def delays_of(text: str, received_at: float) -> list[float]:
    return [received_at - float(line) for line in text.splitlines() if line.strip()]


async def pipe_baseline(lines: int) -> list[float]:
    delays: list[float] = []
    async with await anyio.open_process(
        ["sh", "-c", printing_clock(lines)], stdout=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        pending = b""
        async for chunk in process.stdout:
            now = time.time()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            delays += delays_of(b"\n".join(complete).decode(), now)
    return delays


async def follow(http: httpx.AsyncClient, task_id: str, run_id: str) -> list[float]:
    delays: list[float] = []
    url = f"/tasks/{task_id}/runs/{run_id}/output"
    pending = ""
    async with http.stream("GET", url, params={"follow": "true"}) as response:
        event = ""
        async for line in response.aiter_lines():
            now = time.time()
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "output":
                pending += json.loads(line.removeprefix("data: "))["text"]
                complete, _, pending = pending.rpartition("\n")
                delays += delays_of(complete, now)
            elif line.startswith("data: ") and event == "end":
                break
    return delays


def summary(delays: list[float]) -> str:
    ms = sorted(1000 * d for d in delays)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{len(ms)} lines, p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, "
        f"max {ms[-1]:.1f} ms"
    )


async def main(lines: int, followers: int) -> None:
    baseline = await pipe_baseline(lines)
    print(f"baseline (read from the pipe): {summary(baseline)}")

    prefix = f"taskq-bench-{uuid.uuid4().hex[:8]}:"
    try:
        async with running(["serve"], service_env(prefix)) as service:
            assert service.api_url is not None
            async with httpx.AsyncClient(base_url=service.api_url, timeout=60) as http:
                body = {"id": "clock", "name": "clock", "command": printing_clock(lines)}
                (await http.post("/tasks", json=body)).raise_for_status()
                run = (await http.post("/tasks/clock/execute")).json()
                results: list[list[float]] = []

                async def one() -> None:
                    results.append(await follow(http, "clock", run["run_id"]))

                async with anyio.create_task_group() as tg:
                    for _ in range(followers):
                        tg.start_soon(one)
        live = [d for delays in results for d in delays]
        assert len(live) == lines * followers, f"got {len(live)} lines"
        p50 = statistics.median(live)
        print(f"live through taskq serve, {followers} follower(s): {summary(live)}")
        print(
            f"p50 delay = {p50 / FLUSH_SECONDS:.2f} x the {FLUSH_SECONDS * 1000:.0f} ms "
            f"batching interval; {p50 / statistics.median(baseline):,.0f} x the pipe's p50"
        )
    finally:
        await delete_keys(prefix)
        await delete_amqp_layout(AMQP_URL, prefix=prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Delay of live output to followers")
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--followers", type=int, default=1)
    options = parser.parse_args()
    anyio.run(main, options.lines, options.followers)

"""How fast the API creates and lists tasks, against a handler that does nothing.

Run on demand (needs Redis and RabbitMQ like the tests, and ``wrk``):

    .venv/bin/python -m tests.bench.api_create [--seconds 5] [--source DIR] [--profile FILE]

It starts ``taskq serve --roles api`` with bearer tokens on (through
``trivial_route_server.py``: taskq itself, its app with one more route that exists only in
that process) and measures with ``wrk`` (C, 2 threads: not the bottleneck), in the same
run and each for ``--seconds``:

- trivial: ``POST /bench/trivial`` with a task's body, a Litestar handler that returns a
  constant without reading it, behind the same server, middleware and authentication;
- create: ``POST /tasks``, a new id each request;
- bulk: ``POST /bulk/tasks`` with 100 new tasks per request (tasks/s);
- list: ``GET /tasks?limit=100`` over the tasks created so far.

It prints requests/s, latency p50/p99 and the server's CPU time per request for each,
and ``POST /tasks`` / trivial.
``--source DIR`` serves another checkout's ``app`` and ``cli`` (``PYTHONPATH``): run it
once with main's source and once without to compare before and after in one sitting.
``--profile FILE`` records the create phase with py-spy: a flame graph (SVG), or
collapsed stacks when FILE ends with ``.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import redis.asyncio as redis

from tests.bench.throughput import cpu_seconds
from tests.conftest import REDIS_URL, delete_keys
from tests.e2e.harness import running, service_env

TOKEN = "bench-token"
THREADS = 2
CONNECTIONS = 16
BULK_SIZE = 100
SERVER = Path(__file__).with_name("trivial_route_server.py")

# One wrk script for every phase: each request gets ids no other request (or run) used.
# BODY(first_id) is spliced in per phase; `done` prints the figures as one JSON line.
WRK_SCRIPT = """
wrk.method = "{method}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local counter = 0
function request()
  counter = counter + 1
  local first = "{run}-" .. tid .. "-" .. counter
  return wrk.format(nil, "{path}", nil, {body})
end
function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{{"requests": %d, "seconds": %f, "bad_status": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration / 1e6, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
ONE_TASK = """string.format('{"id":"%s","name":"bench","command":"true"}', first)"""
BULK = """(function()
    local items = {{}}
    for i = 1, {size} do
      items[i] = string.format('{{"id":"%s-%d","name":"bench","command":"true"}}', first, i)
    end
    return '{{"tasks":[' .. table.concat(items, ",") .. ']}}'
  end)()"""


@dataclass(frozen=True)
class Figures:
    requests: int
    seconds: float
    bad_status: int
    socket_errors: int
    p50_us: int
    p99_us: int
    server_cpu: float = 0.0
    """CPU seconds the server process used meanwhile."""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def line(self, what: str, unit: str = "requests/s", per_request: int = 1) -> str:
        errors = ""
        if self.bad_status or self.socket_errors:
            errors = f" ({self.bad_status} non-2xx, {self.socket_errors} socket errors)"
        cpu = 1e6 * self.server_cpu / self.requests
        return (
            f"{what:<28} {self.rate * per_request:>9,.0f} {unit:<11} "
            f"p50 {self.p50_us / 1000:6.2f} ms  p99 {self.p99_us / 1000:6.2f} ms  "
            f"server CPU {cpu:5.0f} us/request{errors}"
        )


async def measure(
    url: str, *, method: str, path: str, body: str, seconds: float, run: str
) -> Figures:
    """Load ``url + path`` with wrk for ``seconds``; its figures."""
    script = WRK_SCRIPT.format(method=method, token=TOKEN, run=run, path=path, body=body)
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as file:
        file.write(script)
        file.flush()
        result = await anyio.run_process(
            [
                "wrk",
                f"-t{THREADS}",
                f"-c{CONNECTIONS}",
                f"-d{seconds:g}s",
                "--timeout",
                "10s",
                "-s",
                file.name,
                url + path,
            ]
        )
    last = result.stdout.decode().strip().splitlines()[-1]
    return Figures(**json.loads(last))


async def main(seconds: float, source: str | None, profile: str | None) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    prefix = f"taskq-bench-{uuid.uuid4().hex[:8]}:"
    run = uuid.uuid4().hex[:6]
    extra = {"TASKQ_API_TOKENS": TOKEN}
    if source is not None:
        extra["PYTHONPATH"] = source
    env = service_env(prefix, **extra)
    store = redis.Redis.from_url(REDIS_URL)
    served = source or "this checkout"
    print(f"serving {served}: wrk -t{THREADS} -c{CONNECTIONS}, {seconds:g} s a phase")
    try:
        async with running(
            ["serve", "--roles", "api"],
            env,
            name="api",
            command=[sys.executable, str(SERVER)],
        ) as api:
            assert api.api_url is not None
            url = api.api_url

            async def phase(method: str, path: str, body: str, tag: str) -> Figures:
                cpu = cpu_seconds(api.process.pid)
                figures = await measure(
                    url, method=method, path=path, body=body, seconds=seconds, run=f"{run}{tag}"
                )
                return replace(figures, server_cpu=cpu_seconds(api.process.pid) - cpu)

            trivial = await phase("POST", "/bench/trivial", ONE_TASK, "t")
            print(trivial.line("trivial POST"))
            async with py_spy(api.process.pid, profile):
                create = await phase("POST", "/tasks", ONE_TASK, "c")
            print(create.line("POST /tasks"))
            before = await store.zcard(f"{prefix}tasks")
            bulk = await phase("POST", "/bulk/tasks", BULK.format(size=BULK_SIZE), "b")
            if bulk.bad_status == bulk.requests:
                print(f"{'POST /bulk/tasks':<28} not served here")
            else:
                print(bulk.line(f"POST /bulk/tasks x{BULK_SIZE}", "tasks/s", BULK_SIZE))
                stored = await store.zcard(f"{prefix}tasks") - before
                print(f"{'':<28} {stored:,} tasks stored ({bulk.requests:,} requests answered)")
            listed = await phase("GET", "/tasks?limit=100", "nil", "l")
            total = await store.zcard(f"{prefix}tasks")
            print(listed.line(f"GET /tasks?limit=100 ({total:,})"))
            print(f"POST /tasks / trivial: {create.rate / trivial.rate:.2f}")
    finally:
        await store.aclose()
        await delete_keys(prefix)


@asynccontextmanager
async def py_spy(pid: int, output: str | None) -> AsyncIterator[None]:
    """Record ``pid`` with py-spy into ``output`` while inside (nothing without ``output``)."""
    if output is None:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    raw = ["--format", "raw"] if output.endswith(".txt") else []
    process = await anyio.open_process(
        [str(spy), "record", "--pid", str(pid), "--output", output, "--nonblocking", *raw],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await anyio.sleep(0.5)  # attached before the load starts
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes what it recorded and exits
        with anyio.fail_after(30):
            await process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="API create/list rates against a trivial handler")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--source", help="serve the app and cli of this checkout instead")
    parser.add_argument("--profile", help="write a py-spy flame graph of POST /tasks here")
    options = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    anyio.run(main, options.seconds, options.source, options.profile)

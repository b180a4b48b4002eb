"""The throwaway servers of ``tests/e2e/servers.py`` start, restart and go away; a test
run with no server to use starts its own, or says at once what to install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiormq
import anyio
import pytest
import redis.asyncio as redis

from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.servers import (
    free_ports,
    port_accepts,
    process_alive,
    throwaway_rabbitmq,
    throwaway_redis,
)

pytestmark = pytest.mark.e2e


async def test_a_throwaway_redis_keeps_what_its_aof_acknowledged_across_a_kill(
    tmp_path: Path,
) -> None:
    async with throwaway_redis(tmp_path) as server:
        assert server.port != 6379
        await command(server.url, "SET", "before-kill", "kept")
        await server.kill()
        assert not await port_accepts(server.port)
        await server.start()
        assert await command(server.url, "GET", "before-kill") == "kept"
        await command(server.url, "SET", "before-stop", "kept too")
        await server.stop()
        await server.start()
        assert await command(server.url, "GET", "before-stop") == "kept too"
        directory, port = server.directory, server.port
    assert not directory.exists()
    assert not await port_accepts(port)


async def test_a_throwaway_redis_without_aof_forgets_on_restart(tmp_path: Path) -> None:
    async with throwaway_redis(tmp_path, appendonly=False) as server:
        await command(server.url, "SET", "key", "value")
        await server.kill()
        await server.start()
        assert await command(server.url, "GET", "key") is None


async def command(url: str, *args: str) -> Any:
    """One command on a connection of its own (the server restarts between commands)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return await client.execute_command(*args)  # pyright: ignore[reportUnknownMemberType]
    finally:
        await client.aclose()


async def test_a_throwaway_rabbitmq_node_stops_and_starts_its_app(tmp_path: Path) -> None:
    async with throwaway_rabbitmq(tmp_path) as node:
        assert node.port != 5672
        print(f"node started in {node.started_in:.1f} s")
        async with aiormq.connect(node.url) as connection:
            channel = await connection.channel()
            await channel.queue_declare("persisted", durable=True)
            await channel.basic_publish(
                b"hello",
                routing_key="persisted",
                properties=aiormq.spec.Basic.Properties(delivery_mode=2),
            )
        await node.stop_app()
        assert not await port_accepts(node.port)
        await node.start_app()
        async with aiormq.connect(node.url) as connection:
            channel = await connection.channel()
            declared = await channel.queue_declare("persisted", passive=True)
            assert declared.message_count == 1
        base, port, beam = node.base, node.port, node.beam
    assert beam is not None
    assert not base.exists()
    assert not await port_accepts(port)
    assert not process_alive(beam)
    # The servers the other tests use were not touched.
    assert await port_accepts(port_of(REDIS_URL)) and await port_accepts(port_of(AMQP_URL))


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


# --- A test run's own servers -------------------------------------------------------------

STARTED_RUN = "TASKQ_TEST_STARTED_RUN"
"""Set for the pytest runs these tests start, which must not start such runs in turn."""
starts_a_test_run = pytest.mark.skipif(
    STARTED_RUN in os.environ, reason="inside a test run that a test started"
)
REPOSITORY = Path(__file__).parents[2]
RUN_SECONDS = 300.0
"""Bound for a started run (a throwaway RabbitMQ node alone may take 30 s on a busy machine)."""
THROWAWAY = re.compile(r"throwaway server at (\S+), started for this run")
SERVER_TESTS = [  # a few of each kind: contract, in-process API, real ``taskq`` processes
    "tests/contract/test_task_store_contract.py",
    "tests/contract/test_broker_contract.py::test_round_trip",
    "tests/api/test_api.py::test_create_answers_201_with_the_full_task",
    "tests/e2e/test_serve.py::test_one_process_runs_tasks_through_redis_and_rabbitmq",
]


@starts_a_test_run
async def test_with_no_server_answering_the_tests_run_on_throwaway_servers_and_remove_them(
    tmp_path: Path,
) -> None:
    temp = tmp_path / "tmp"  # every process of the run, and every folder, is under this
    temp.mkdir()
    env = nothing_at(temp)
    result, took = await run_pytest(*SERVER_TESTS, "-k", "redis or amqp", "-rA", env=env)
    output = result.stdout.decode(errors="replace")
    print(f"run with its own servers: {took:.1f} s")
    assert result.returncode == 0, output
    for tests in SERVER_TESTS:  # the Redis and AMQP cases of each, on the throwaway servers
        assert f"PASSED {tests}" in output, output
    urls = THROWAWAY.findall(output)
    assert [urlsplit(url).scheme for url in urls] == ["redis", "amqp"], output
    for url in urls:
        assert not await port_accepts(port_of(url))
    assert processes_with(f"TMPDIR={temp}") == []
    assert [entry.name for entry in temp.iterdir() if not entry.name.startswith("pytest-")] == []


@starts_a_test_run
async def test_with_no_server_and_no_programs_to_start_one_the_tests_stop_at_once_saying_why(
    tmp_path: Path,
) -> None:
    nowhere = tmp_path / "no-programs"
    nowhere.mkdir()
    env = nothing_at(tmp_path) | {"PATH": str(nowhere), "TASKQ_TEST_RABBITMQ_BIN": str(nowhere)}
    result, took = await run_pytest("tests/contract", env=env)
    output = (result.stdout + result.stderr).decode(errors="replace")
    print(f"stopped after {took:.1f} s")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    [line] = [line for line in output.splitlines() if line.strip()]
    assert line.startswith("Exit: nothing answers at redis://127.0.0.1:"), line
    for advice in ("apt-get install redis-server rabbitmq-server", "TASKQ_TEST_REDIS_URL"):
        assert advice in line


def nothing_at(temp: Path) -> dict[str, str]:
    """The environment of a test run whose configured servers are ports nobody listens on."""
    redis_port, amqp_port = free_ports(2)
    return os.environ | {
        "TASKQ_TEST_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "TASKQ_TEST_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{amqp_port}/",
        "TMPDIR": str(temp),
        STARTED_RUN: "1",
    }


async def run_pytest(
    *args: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run pytest on ``args`` in this repository (bounded); its result and how long it took."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    began = anyio.current_time()
    with anyio.fail_after(RUN_SECONDS):
        result = await anyio.run_process(command, cwd=REPOSITORY, env=env, check=False)
    return result, anyio.current_time() - began


def processes_with(variable: str) -> list[int]:
    """The live processes whose environment holds ``variable`` (``NAME=value``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if variable.encode() in environ.split(b"\0") and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return found

"""The watchdog program on its own: what it stops when its consumer's pipe ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from app import process_groups
from app.executor import CappedOutput, run_command
from app.watchdog import MARK_VARIABLE, Watchdog, watching_commands
from tests.conftest import eventually
from tests.processes import alive

MARK = f"{MARK_VARIABLE}=test-{os.getpid()}"


@asynccontextmanager
async def sleeper(env: dict[str, str]) -> AsyncGenerator[Process]:
    """``sleep 60`` as the leader of a session of its own, killed on exit if still there."""
    process = await anyio.open_process(["sleep", "60"], env=env, start_new_session=True)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()


async def watchdog_reading(lines: bytes) -> None:
    """Run the watchdog program with ``lines`` as the whole of its pipe, until it exits."""
    argv = [sys.executable, "-I", process_groups.__file__, "0.5", MARK]
    with anyio.fail_after(10):
        await anyio.run_process(argv, input=lines, stdout=subprocess.DEVNULL, stderr=None)


async def test_registered_groups_are_stopped_when_the_pipe_ends() -> None:
    async with sleeper({}) as guarded:
        await watchdog_reading(b"+%d\n" % guarded.pid)
        with anyio.fail_after(5):
            await guarded.wait()
        assert guarded.returncode == -signal.SIGTERM


async def test_an_unregistered_command_is_found_by_the_mark_in_its_environment() -> None:
    # A command the consumer started but had not yet registered when it died.
    key, _, value = MARK.partition("=")
    async with sleeper({key: value}) as unregistered:
        await watchdog_reading(b"")
        with anyio.fail_after(5):
            await unregistered.wait()


async def test_released_and_unmarked_processes_are_left_alone() -> None:
    async with sleeper({}) as released, sleeper({MARK_VARIABLE: "another-consumer"}) as other:
        await watchdog_reading(b"+%d\n-%d\n" % (released.pid, released.pid))
        assert alive(released.pid) and alive(other.pid)


async def test_a_command_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    argv = ["sh", "-c", "trap '' TERM; echo ready; sleep 60 & wait"]
    async with await anyio.open_process(
        argv, stdout=subprocess.PIPE, start_new_session=True
    ) as stubborn:
        assert stubborn.stdout is not None
        await stubborn.stdout.receive()  # the trap is set
        await watchdog_reading(b"+%d\n" % stubborn.pid)
        with anyio.fail_after(5):
            await stubborn.wait()
        assert stubborn.returncode == -signal.SIGKILL


async def test_commands_run_with_a_watchdog_carry_its_mark() -> None:
    output = CappedOutput(4096)
    async with watching_commands() as watchdog:
        outcome = await run_command(
            ["sh", "-c", f'echo "${MARK_VARIABLE}"'],
            env={},
            cwd=None,
            time_limit=None,
            output=output,
            watchdog=watchdog,
        )
    assert outcome.output == f"{watchdog.mark}\n"


async def test_the_watchdog_holds_no_secrets_and_exits_with_its_context() -> None:
    async with watching_commands() as watchdog:
        found: list[int] = []

        def listed() -> bool:
            # Its command line is in place a moment after the spawn returns.
            found[:] = [c for c in children(os.getpid()) if mark in proc_file(c, "cmdline")]
            return bool(found)

        mark = watchdog.mark.encode()
        await eventually(listed, within=5)
        [pid] = found
        environ = proc_file(pid, "environ")
        assert environ.split(b"\0") == [b"PATH=" + os.fsencode(os.defpath), b""]
    await eventually(lambda: not alive(pid), within=5)


def proc_file(pid: int, name: str) -> bytes:
    """The file ``name`` of ``/proc/PID``; empty once the process is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except FileNotFoundError:
        return b""


def children(parent: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(b")") + 2 :].split()[1]) == parent:
            found.append(int(entry.name))
    return found


async def test_a_watchdog_that_cannot_start_stops_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="the command watchdog did not start"):
        async with watching_commands():
            pass


async def test_registrations_wait_for_room_in_a_full_pipe_and_arrive_whole() -> None:
    # A watchdog that has stopped reading for a while: its pipe is full.
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    watchdog = Watchdog(write_end, "mark")
    try:
        filled = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += os.write(write_end, b"x" * 4096)
        done: list[int] = []
        received = b""

        async def register(pgid: int) -> None:
            await watchdog.guard(pgid)
            done.append(pgid)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for pgid in (11, 22):
                    tg.start_soon(register, pgid)
                await anyio.sleep(0.05)
                assert done == []  # waiting, not lost
                received = os.read(read_end, filled)  # the watchdog reads again
                await eventually(lambda: len(done) == 2, within=5)
        received += os.read(read_end, 65536)
    finally:
        watchdog.close()
        os.close(read_end)
    assert sorted(received[filled:].splitlines()) == [b"+11", b"+22"]


async def test_a_gone_watchdog_is_reported_and_does_not_stop_commands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    watchdog = Watchdog(write_end, "mark")
    try:
        outcome = await run_command(
            ["/bin/sh", "-c", "echo ran"],
            env={},
            cwd=None,
            time_limit=None,
            output=CappedOutput(4096),
            watchdog=watchdog,
        )
    finally:
        watchdog.close()
    assert outcome.output == "ran\n"
    assert [r.message for r in caplog.records].count(
        "the watchdog is gone: commands would outlive a crash of this process"
    ) == 1

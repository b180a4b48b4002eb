"""How ``run_command`` starts and awaits a command, both ways: through a pidfd (the way on
this kernel) and through AnyIO's process API (the fallback without pidfds).

Through a pidfd, a command is started with ``posix_spawn`` when its program is a path
and it needs no working directory, else with ``Popen``: ``/bin/sh`` and ``sh`` below
take one way each.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from app import executor
from app.domain import Outcome
from app.executor import CappedOutput, inherited_environment, run_command
from tests.conftest import eventually
from tests.unit.test_executor import WAIT, read_pids, still_running, write_pids

LIMIT = 1_048_576


@pytest.fixture(params=["pidfd", "anyio"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way commands are awaited: through a pidfd, or AnyIO's fallback."""
    if request.param == "pidfd" and not executor.WAIT_THROUGH_PIDFD:
        pytest.skip("this kernel has no pidfd")
    monkeypatch.setattr(executor, "WAIT_THROUGH_PIDFD", request.param == "pidfd")
    return request.param  # type: ignore[no-any-return]


async def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    time_limit: float | None = None,
    output: CappedOutput | None = None,
) -> Outcome:
    with anyio.fail_after(WAIT):
        return await run_command(
            argv,
            env=inherited_environment() if env is None else env,
            cwd=cwd,
            time_limit=time_limit,
            output=CappedOutput(LIMIT) if output is None else output,
        )


def open_descriptors() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


# --- how a command starts -------------------------------------------------------------

# Its pid, process group and session (fields 1, 5 and 6 of /proc/PID/stat), its stdin,
# whether stdout and stderr are one pipe, and two variables of its environment.
DESCRIBE_SELF = r"""
set -- $(cat /proc/$$/stat)
echo "ids $1 $5 $6"
echo "stdin $(readlink /proc/$$/fd/0)"
[ "$(readlink /proc/$$/fd/1)" = "$(readlink /proc/$$/fd/2)" ] && echo "one pipe"
echo "env ${GREETING-unset} ${HOME-unset}"
echo "cwd $(pwd -P)"
"""

STARTS = [
    pytest.param("/bin/sh", False, id="posix_spawn"),
    pytest.param("sh", False, id="popen-path-search"),
    pytest.param("/bin/sh", True, id="popen-cwd"),
]


@pytest.mark.parametrize(("shell", "in_tmp"), STARTS)
async def test_a_command_starts_in_a_session_of_its_own_with_the_given_environment(
    way: str, shell: str, in_tmp: bool, tmp_path: Path
) -> None:
    env = {"PATH": os.environ["PATH"], "GREETING": "hello"}
    cwd = str(await anyio.Path(tmp_path).resolve()) if in_tmp else None
    outcome = await run([shell, "-c", DESCRIBE_SELF], env=env, cwd=cwd)
    assert outcome.exit_code == 0, outcome
    lines = outcome.output.splitlines()
    pid, group, session = lines[0].split()[1:]
    assert pid == group == session
    assert lines[1:4] == ["stdin /dev/null", "one pipe", "env hello unset"]
    assert lines[4] == f"cwd {cwd or os.getcwd()}"


@pytest.mark.parametrize(("shell", "in_tmp"), STARTS)
async def test_a_command_starts_with_sigpipe_at_its_default(
    way: str, shell: str, in_tmp: bool, tmp_path: Path
) -> None:
    # Python ignores SIGPIPE, and an ignored signal stays ignored across exec: the writer
    # of a pipeline whose reader is gone would carry on (``yes | head``).
    cwd = str(tmp_path) if in_tmp else None
    outcome = await run([shell, "-c", "kill -PIPE $$; echo survived"], cwd=cwd)
    assert outcome.exit_code == 141
    assert outcome.error == "killed by SIGPIPE"
    assert outcome.output == ""


COULD_NOT_START = [
    pytest.param(["/nonexistent/taskq-no-such-program"], None, {}, id="missing-program"),
    pytest.param(["taskq-no-such-program-on-path"], None, {}, id="not-on-path"),
    pytest.param(["/bin"], None, {}, id="a-directory"),
    pytest.param(["/bin/true"], "/nonexistent/taskq-no-such-dir", {}, id="missing-cwd"),
    pytest.param(["/bin/printf", "a\0b"], None, {}, id="nul-in-argument"),
    pytest.param(["/bin/true"], None, {"BAD": "a\0b"}, id="nul-in-environment"),
    pytest.param(["/bin/true"], None, {"BAD=": "x"}, id="equals-in-name"),
]


@pytest.mark.parametrize(("argv", "cwd", "extra_env"), COULD_NOT_START)
async def test_a_command_that_cannot_start_is_reported_alike_both_ways(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], cwd: str | None, extra_env: dict[str, str]
) -> None:
    if not executor.WAIT_THROUGH_PIDFD:
        pytest.skip("this kernel has no pidfd")
    errors: list[str | None] = []
    for through_pidfd in (True, False):
        monkeypatch.setattr(executor, "WAIT_THROUGH_PIDFD", through_pidfd)
        outcome = await run(argv, cwd=cwd, env=inherited_environment() | extra_env)
        assert outcome.exit_code is None
        assert outcome.output == ""
        errors.append(outcome.error)
    assert errors[0] is not None
    assert errors[0].startswith("could not start the command: ")
    assert errors[0] == errors[1]


async def test_an_empty_argv_cannot_start(way: str) -> None:
    outcome = await run([])
    assert outcome.error == "could not start the command: no program to run"


async def test_a_command_gets_no_descriptor_this_process_inherited(tmp_path: Path) -> None:
    # ``posix_spawn`` has no ``close_fds``: a descriptor the consumer inherited from
    # whatever started it must not reach its commands (a fresh process, as at start).
    read_end, write_end = os.pipe()
    check = f"[ -e /proc/$$/fd/{write_end} ] && echo inherited || echo not"
    script = (
        "import anyio\n"
        "from app.executor import CappedOutput, run_command\n"
        "async def main():\n"
        "    for argv, cwd in ((['/bin/sh'], None), (['sh'], None), (['/bin/sh'], '/')):\n"
        "        outcome = await run_command(\n"
        f"            [*argv, '-c', {check!r}],\n"
        "            env={}, cwd=cwd, time_limit=None, output=CappedOutput(100))\n"
        "        print(outcome.output, end='')\n"
        "anyio.run(main)\n"
    )
    try:
        with anyio.fail_after(WAIT):
            result = await anyio.run_process(
                [sys.executable, "-c", script], pass_fds=(write_end,), cwd=Path.cwd()
            )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.stdout == b"not\nnot\nnot\n"


# --- waiting and collecting -----------------------------------------------------------


async def test_output_larger_than_the_pipe_buffer_arrives_whole_and_in_order(way: str) -> None:
    chunks: list[bytes] = []
    output = CappedOutput(LIMIT, listener=chunks.append)
    expected = "".join(f"{i}\n" for i in range(1, 100_001))  # 589 KB: nine pipe buffers
    outcome = await run(["/bin/sh", "-c", "seq 1 100000; echo end >&2"], output=output)
    assert outcome.exit_code == 0
    assert not outcome.truncated
    assert outcome.output == expected + "end\n"
    assert b"".join(chunks) == (expected + "end\n").encode()


async def test_a_grandchild_that_left_the_group_holds_the_run_one_second_at_most(
    way: str, tmp_path: Path
) -> None:
    # The grandchild starts a session of its own (out of reach of the group's signals)
    # and keeps the output pipe open for a minute.
    pids_file = tmp_path / "pids"
    grandchild = write_pids(pids_file, "$$") + "; exec sleep 60"
    # The leader waits until the grandchild is out of the group, then exits.
    script = f"setsid /bin/sh -c '{grandchild}' & "
    script += f'until [ -e "{pids_file}" ]; do sleep 0.01; done; echo done'

    started = time.monotonic()
    try:
        outcome = await run(["/bin/sh", "-c", script])
        elapsed = time.monotonic() - started
        assert outcome.exit_code == 0
        assert outcome.output == "done\n"
        assert elapsed < 3
    finally:
        [pid] = await read_pids(pids_file, 1)
        os.kill(pid, signal.SIGKILL)


async def test_a_timeout_stops_the_group_and_keeps_what_it_printed(
    way: str, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    script = "echo before; sleep 60 & " + write_pids(pids_file, "$$", "$!") + "; wait"
    outcome = await run(["/bin/sh", "-c", script], time_limit=0.3)
    assert outcome.timed_out
    assert outcome.error == "timed out after 0.3 s"
    assert outcome.exit_code == 128 + 15
    assert outcome.output == "before\n"
    assert still_running(await read_pids(pids_file, 2)) == []


async def test_output_printed_while_the_group_stops_is_collected_meanwhile(way: str) -> None:
    # Once the leader is gone, a member of its group answers SIGTERM with more output
    # than the pipe holds: unless it is read meanwhile, it blocks until SIGKILL.
    member = "trap 'seq 1 30000; exit 0' TERM; echo started; sleep 60 & wait"
    started = time.monotonic()
    outcome = await run(["/bin/sh", "-c", f'/bin/sh -c "{member}" & wait'], time_limit=0.3)
    elapsed = time.monotonic() - started
    assert outcome.timed_out
    assert outcome.output == "started\n" + "".join(f"{i}\n" for i in range(1, 30_001))
    assert elapsed < 3  # well within the 5 s grace


async def test_no_descriptor_is_left_open_however_runs_end(way: str, tmp_path: Path) -> None:
    await run(["/bin/true"])  # what is opened once (/dev/null for stdin) is open now
    before = open_descriptors()
    for attempt in range(5):
        assert (await run(["/bin/sh", "-c", "echo hi"])).exit_code == 0
        assert (await run(["sh", "-c", "exit 2"], cwd=str(tmp_path))).exit_code == 2
        assert (await run(["/bin/sh", "-c", "seq 1 50000"])).exit_code == 0
        assert (await run(["/nonexistent/program"])).error is not None
        assert (await run(["true"], cwd="/nonexistent/dir")).error is not None
        assert (await run(["/bin/sh", "-c", "sleep 60"], time_limit=0.05)).timed_out
        assert (await run(["/bin/sh", "-c", "sleep 60 & echo x"])).exit_code == 0
        with anyio.move_on_after(0.05 * (attempt + 1)) as cancelled:
            await run(["/bin/sh", "-c", "sleep 60"])
        assert cancelled.cancelled_caught
    if way == "pidfd":
        assert open_descriptors() == before  # every one closed before run_command returned
    else:
        # asyncio's pipe transports close their descriptors soon after ``aclose()``.
        await eventually(lambda: open_descriptors() == before, within=2)


async def test_waiting_for_a_command_takes_no_thread() -> None:
    if not executor.WAIT_THROUGH_PIDFD:
        pytest.skip("this kernel has no pidfd")
    before = {thread.ident for thread in threading.enumerate()}
    started: list[set[int | None]] = []

    def threads_started(_: bytes) -> None:
        started.append({thread.ident for thread in threading.enumerate()} - before)

    output = CappedOutput(LIMIT, listener=threads_started)
    await run(["/bin/sh", "-c", "echo 1; sleep 0.2; echo 2"], output=output)
    assert started == [set(), set()]


@pytest.fixture
def failing_pidfd_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pidfd_open`` failing as it does when the process is out of descriptors."""

    def out_of_descriptors(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pidfd_open", out_of_descriptors)


@pytest.mark.usefixtures("failing_pidfd_open")
async def test_a_command_that_cannot_be_awaited_is_killed_at_once() -> None:
    if not executor.WAIT_THROUGH_PIDFD:
        pytest.skip("this kernel has no pidfd")
    await run(["/bin/true"])  # what is opened once (/dev/null for stdin) is open now
    before = open_descriptors()
    # Children the session started before (the browser tests' Playwright driver) stay.
    others = children()
    outcome = await run(["/bin/sh", "-c", "sleep 60"])
    assert outcome.error == "could not start the command: [Errno 24] Too many open files"
    assert open_descriptors() == before
    # Killed and reaped: no child of this process is left, running or a zombie.
    assert set(children()) - set(others) == set()


def children() -> list[int]:
    """The processes whose parent is this one, zombies included."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(b")") + 2 :].split()[1]) == os.getpid():
            found.append(int(entry.name))
    return found

"""``run_command`` and ``CappedOutput`` against real processes, on asyncio and trio.

Where a test needs to know what a command started, the command writes the pids to a
file (``$$`` is the process group, ``$!`` each background child); afterwards no member
of that group may still be running.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from app.domain import Outcome
from app.executor import (
    SERVER_SECRETS,
    CappedOutput,
    inherited_environment,
    run_command,
    stored_size,
)

WAIT = 10.0
"""Bound for anything that should happen."""
LIMIT = 1_048_576
MARKER = re.compile(r"\n\[\.\.\. (\d+) bytes of output omitted \.\.\.\]\n")


async def shell(
    script: str,
    *,
    time_limit: float | None = None,
    output_limit: int = LIMIT,
    kill_grace: float = 5.0,
    cwd: str | None = None,
) -> Outcome:
    with anyio.fail_after(WAIT):
        return await run_command(
            ["sh", "-c", script],
            env=inherited_environment(),
            cwd=cwd,
            time_limit=time_limit,
            output=CappedOutput(output_limit),
            kill_grace=kill_grace,
        )


def split_truncated(text: str) -> tuple[str, int, str]:
    """The head, the omitted byte count and the tail of a truncated output."""
    match = MARKER.search(text)
    assert match is not None, text[:200]
    return text[: match.start()], int(match.group(1)), text[match.end() :]


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def running_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that have not exited."""
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


def still_running(pids: list[int]) -> list[int]:
    """The pids of ``pids`` and of the group of ``pids[0]`` (``$$``) that still run."""
    return [pid for pid in pids if is_running(pid)] + running_members(pids[0])


async def read_pids(path: Path, count: int, *, poll: float = 0.01) -> list[int]:
    """The ``count`` pids a command wrote to ``path``, waiting until it has written them."""
    with anyio.fail_after(WAIT):
        while True:
            if await anyio.Path(path).exists():
                pids = [int(word) for word in (await anyio.Path(path).read_text()).split()]
                if len(pids) == count:
                    return pids
            await anyio.sleep(poll)


# Pids go to a temporary file renamed into place, so that a reader never sees half of them.
def write_pids(path: Path, *words: str) -> str:
    return f'echo {" ".join(words)} > "{path}.tmp" && mv "{path}.tmp" "{path}"'


# --- exit codes and output -------------------------------------------------------------


async def test_shell_exit_code_and_merged_output() -> None:
    outcome = await shell("echo out; echo err >&2; echo more; exit 3")
    assert outcome.exit_code == 3
    assert outcome.output == "out\nerr\nmore\n"
    assert not outcome.truncated
    assert not outcome.timed_out
    assert outcome.error is None
    assert not outcome.succeeded()


async def test_success() -> None:
    outcome = await shell("echo hello")
    assert outcome.exit_code == 0
    assert outcome.output == "hello\n"
    assert outcome.error is None
    assert outcome.succeeded()
    assert outcome.duration >= 0


async def test_args_run_without_a_shell() -> None:
    with anyio.fail_after(WAIT):
        outcome = await run_command(
            ["printf", "%s|", "a b", "$HOME", "*"],
            env=inherited_environment(),
            cwd=None,
            time_limit=None,
            output=CappedOutput(LIMIT),
        )
    assert outcome.exit_code == 0
    assert outcome.output == "a b|$HOME|*|"


async def test_killed_by_a_signal() -> None:
    outcome = await shell("kill -9 $$")
    assert outcome.exit_code == 137
    assert outcome.error is not None
    assert "SIGKILL" in outcome.error
    assert not outcome.timed_out
    assert not outcome.succeeded()


# --- environment and working directory ------------------------------------------------


async def test_cwd_is_applied(tmp_path: Path) -> None:
    outcome = await shell("pwd -P", cwd=str(tmp_path))
    assert outcome.output == f"{await anyio.Path(tmp_path).resolve()}\n"


async def test_env_is_the_whole_environment() -> None:
    with anyio.fail_after(WAIT):
        outcome = await run_command(
            ["sh", "-c", 'printf "%s %s" "$GREETING" "${HOME-unset}"'],
            env={"GREETING": "hello there", "PATH": os.environ["PATH"]},
            cwd=None,
            time_limit=None,
            output=CappedOutput(LIMIT),
        )
    assert outcome.output == "hello there unset"


def test_inherited_environment_leaves_out_server_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVER_SECRETS:
        monkeypatch.setenv(name, f"secret-{name}")
    monkeypatch.setenv("TASKQ_TEST_ORDINARY", "kept")
    environment = inherited_environment()
    assert SERVER_SECRETS.isdisjoint(environment)
    assert environment["TASKQ_TEST_ORDINARY"] == "kept"


async def test_commands_do_not_see_server_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVER_SECRETS:
        monkeypatch.setenv(name, f"secret-{name}")
    outcome = await shell("env")
    assert "secret-" not in outcome.output


# --- commands that cannot start -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "cwd"),
    [
        pytest.param(["/nonexistent/taskq-no-such-program"], None, id="missing-program"),
        pytest.param(["taskq-no-such-program-on-path"], None, id="program-not-on-path"),
        pytest.param(["true"], "/nonexistent/taskq-no-such-dir", id="missing-cwd"),
        pytest.param(["printf", "a\0b"], None, id="nul-in-argument"),
    ],
)
async def test_could_not_start(argv: list[str], cwd: str | None) -> None:
    with anyio.fail_after(WAIT):
        outcome = await run_command(
            argv, env=inherited_environment(), cwd=cwd, time_limit=None, output=CappedOutput(LIMIT)
        )
    assert outcome.exit_code is None
    assert outcome.error is not None
    assert outcome.error.startswith("could not start")
    assert outcome.output == ""
    assert not outcome.succeeded()


# --- the output cap -------------------------------------------------------------------


async def test_large_output_keeps_head_and_tail() -> None:
    limit = 10_000
    expected = "".join(f"{i}\n" for i in range(1, 1_000_001))  # about 6.9 MB
    outcome = await shell("seq 1 1000000", output_limit=limit)
    assert outcome.exit_code == 0
    assert outcome.truncated
    head, omitted, tail = split_truncated(outcome.output)
    assert head == expected[: limit // 2]
    assert tail == expected[-(limit - limit // 2) :]
    assert omitted == len(expected) - limit
    assert len(outcome.output) <= limit + len(f"\n[... {omitted} bytes of output omitted ...]\n")


async def test_binary_flood_keeps_first_and_last_bytes() -> None:
    limit = 4096
    outcome = await shell(
        "printf S; head -c 5000000 /dev/zero | tr '\\0' x; printf E", output_limit=limit
    )
    assert outcome.truncated
    head, omitted, tail = split_truncated(outcome.output)
    assert head == "S" + "x" * (limit // 2 - 1)
    assert tail == "x" * (limit // 2 - 1) + "E"
    assert omitted == 5_000_002 - limit


async def test_output_exactly_at_the_cap_is_kept_whole() -> None:
    limit = 100_000
    outcome = await shell(f"head -c {limit} /dev/zero | tr '\\0' y", output_limit=limit)
    assert not outcome.truncated
    assert outcome.output == "y" * limit


async def test_output_one_byte_over_the_cap_is_truncated() -> None:
    limit = 1000
    outcome = await shell(
        f"printf S; head -c {limit - 1} /dev/zero | tr '\\0' y; printf E", output_limit=limit
    )
    assert outcome.truncated
    head, omitted, tail = split_truncated(outcome.output)
    assert omitted == 1
    assert head == "S" + "y" * (limit // 2 - 1)
    assert tail.endswith("E")


async def test_a_flood_of_nul_bytes_is_kept_within_the_limit_as_stored() -> None:
    # JSON stores a NUL as six bytes (\u0000): the cap weighs it so, or 1 MiB of NULs
    # would be a 6 MiB run document to encode and send.
    limit = 4096
    outcome = await shell("printf S; head -c 5000000 /dev/zero; printf E", output_limit=limit)
    assert outcome.truncated
    head, omitted, tail = split_truncated(outcome.output)
    nuls = (limit // 2 - 1) // 6  # beside the S (or the E), each half's share
    assert head == "S" + "\0" * nuls
    assert tail == "\0" * nuls + "E"
    assert omitted == 5_000_002 - len(head) - len(tail)
    stored = msgspec.json.encode(head) + msgspec.json.encode(tail)
    assert len(stored) - 4 <= limit  # less the quotes


async def test_text_with_newlines_and_tabs_keeps_the_limit_in_bytes() -> None:
    # Only what JSON escapes in six bytes weighs more: text output keeps what it kept.
    limit = 1000
    outcome = await shell(
        f"head -c {10 * limit} /dev/zero | tr '\\0' '\\n'; printf 'a\\tb'", output_limit=limit
    )
    head, omitted, tail = split_truncated(outcome.output)
    assert head == "\n" * (limit // 2)
    assert tail == "\n" * (limit // 2 - 3) + "a\tb"
    assert omitted == 10 * limit + 3 - limit


@pytest.mark.parametrize("seed", range(30))
def test_capped_output_keeps_the_longest_ends_that_fit_as_stored(seed: int) -> None:
    chooser = random.Random(seed)
    # Runs of text and of control characters (ASCII, so that text and bytes map one to
    # one), in writes of every size.
    pieces = [b"text ", b"\0", b"\x1b[31m", b"\n", b"\x01\x02", b"\t"]
    original = b"".join(
        chooser.choice(pieces) * chooser.randint(1, 300) for _ in range(chooser.randint(1, 60))
    )
    limit = chooser.choice([1, 7, 100, 1000, 5000])
    cuts = sorted(chooser.sample(range(len(original) + 1), k=min(5, len(original) + 1)))
    edges = [0, *cuts, len(original)]
    output = capture([original[a:b] for a, b in itertools.pairwise(edges)], limit)
    head_room, tail_room = limit // 2, limit - limit // 2
    if not output.truncated:
        assert output.text() == original.decode()
        assert stored_size(original) <= limit
        return
    head_text, omitted, tail_text = split_truncated(output.text())
    head, tail = head_text.encode(), tail_text.encode()
    assert original.startswith(head)
    assert original.endswith(tail)
    assert len(head) + omitted + len(tail) == len(original)
    # Each end is within its half as stored, and is the longest that is.
    assert stored_size(head) <= head_room
    assert stored_size(original[: len(head) + 1]) > head_room
    assert stored_size(tail) <= tail_room
    assert stored_size(original[len(original) - len(tail) - 1 :]) > tail_room


def capture(chunks: list[bytes], limit: int) -> CappedOutput:
    output = CappedOutput(limit)
    for chunk in chunks:
        output.append(chunk)
    return output


def assert_keeps_ends(output: CappedOutput, original: bytes, limit: int) -> None:
    head_size = limit // 2
    tail_size = limit - head_size
    assert output.total == len(original)
    text = output.text()
    if len(original) <= limit:
        assert not output.truncated
        assert text == original.decode()
        return
    assert output.truncated
    head, omitted, tail = split_truncated(text)
    assert head.encode() == original[:head_size]
    assert tail.encode() == (original[-tail_size:] if tail_size else b"")
    assert omitted == len(original) - limit


ORIGINAL = bytes(ord("a") + i % 26 for i in range(10_000))


@pytest.mark.parametrize("limit", [1, 2, 3, 10, 101, 1024, 9_999, 10_000, 10_001, 50_000])
def test_capped_output_one_byte_at_a_time(limit: int) -> None:
    output = capture([ORIGINAL[i : i + 1] for i in range(len(ORIGINAL))], limit)
    assert_keeps_ends(output, ORIGINAL, limit)


@pytest.mark.parametrize("limit", [1, 2, 3, 10, 101, 1024, 9_999, 10_000, 10_001, 50_000])
def test_capped_output_one_huge_write(limit: int) -> None:
    assert_keeps_ends(capture([ORIGINAL], limit), ORIGINAL, limit)


@pytest.mark.parametrize("size", [1, 7, 333, 4096])
@pytest.mark.parametrize("limit", [1, 10, 1000])
def test_capped_output_mixed_writes(size: int, limit: int) -> None:
    chunks = [ORIGINAL[i : i + size] for i in range(0, len(ORIGINAL), size)]
    assert_keeps_ends(capture(chunks, limit), ORIGINAL, limit)


def test_capped_output_limit_one_keeps_the_last_byte() -> None:
    output = capture([b"abc", b"", b"de"], 1)
    assert output.truncated
    head, omitted, tail = split_truncated(output.text())
    assert (head, omitted, tail) == ("", 4, "e")


def test_capped_output_empty_and_small() -> None:
    assert capture([], 10).text() == ""
    assert not capture([], 10).truncated
    small = capture([b"ab", b"c"], 10)
    assert small.text() == "abc"
    assert not small.truncated


# --- time limits and stopping the process group --------------------------------------


async def test_timeout_stops_the_whole_group(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = (
        "sleep 60 & a=$!; sleep 60 & b=$!; " + write_pids(pids_file, "$$", "$a", "$b") + "; wait"
    )
    started = time.monotonic()
    outcome = await shell(script, time_limit=0.5)
    elapsed = time.monotonic() - started
    assert outcome.timed_out
    assert outcome.error == "timed out after 0.5 s"
    assert not outcome.succeeded()
    assert 0.5 <= elapsed < 3
    pids = await read_pids(pids_file, 3)
    assert still_running(pids) == []


async def test_background_child_holding_the_pipe_does_not_hold_the_run(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = "(sleep 60; echo late) & " + write_pids(pids_file, "$$", "$!") + "; echo early"
    started = time.monotonic()
    outcome = await shell(script)
    elapsed = time.monotonic() - started
    assert elapsed < 3
    assert outcome.exit_code == 0
    assert outcome.output == "early\n"
    assert not outcome.timed_out
    assert outcome.error is None
    assert still_running(await read_pids(pids_file, 2)) == []


async def test_a_command_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = "trap '' TERM; sleep 60 & " + write_pids(pids_file, "$$", "$!") + "; wait"
    started = time.monotonic()
    outcome = await shell(script, time_limit=0.3, kill_grace=0.5)
    elapsed = time.monotonic() - started
    assert outcome.timed_out
    assert outcome.exit_code == 137
    # The grace was granted before SIGKILL, and not much more.
    assert 0.8 <= elapsed < 3
    assert still_running(await read_pids(pids_file, 2)) == []


async def test_cancelling_the_caller_stops_the_group_first(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = "sleep 60 & a=$!; sleep 60 & b=$!; " + write_pids(pids_file, "$$", "$a", "$b")
    script += "; wait"
    pids: list[int] = []
    running_at_cancel: list[int] | None = None
    returned: list[Outcome] = []

    async def run_and_watch() -> None:
        nonlocal running_at_cancel
        try:
            returned.append(
                await run_command(
                    ["sh", "-c", script],
                    env=inherited_environment(),
                    cwd=None,
                    time_limit=None,
                    output=CappedOutput(LIMIT),
                    kill_grace=2.0,
                )
            )
        except anyio.get_cancelled_exc_class():
            # What the caller sees at the moment the cancellation reaches it.
            running_at_cancel = still_running(pids)
            raise

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_and_watch)
            pids += await read_pids(pids_file, 3)
            assert all(is_running(pid) for pid in pids)
            tg.cancel_scope.cancel()
    assert returned == []
    assert running_at_cancel == []
    assert still_running(pids) == []


async def test_cancel_just_after_the_start_leaves_nothing_behind(tmp_path: Path) -> None:
    # Cancelling as early as possible: the command may run before ``open_process`` has
    # even returned to ``run_command``. Repeated, as the window is narrow.
    for attempt in range(20):
        pids_file = tmp_path / f"pids-{attempt}"
        script = "sleep 60 & " + write_pids(pids_file, "$$", "$!") + "; wait"
        pids: list[int] = []
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(shell, script)
                pids += await read_pids(pids_file, 2, poll=0)
                tg.cancel_scope.cancel()
        assert still_running(pids) == []


async def test_output_reaches_the_listener_while_the_command_runs_and_survives_a_cancel() -> None:
    seen: list[bytes] = []
    first_line = anyio.Event()

    def listen(chunk: bytes) -> None:
        seen.append(chunk)
        first_line.set()

    output = CappedOutput(LIMIT, listener=listen)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await run_command(
                    ["sh", "-c", "echo started; exec sleep 60"],
                    env=inherited_environment(),
                    cwd=None,
                    time_limit=None,
                    output=output,
                )

            tg.start_soon(run)
            # The line arrives while the command still runs (it sleeps for a minute) ...
            await first_line.wait()
            tg.cancel_scope.cancel()
    # ... and what it printed before the cancel is still there for the run record.
    assert b"".join(seen) == b"started\n"
    assert output.text() == "started\n"

"""Commands that do not outlive their consumer process, however it dies.

A consumer stops its commands' process groups itself when it stops in order. When it
is killed (SIGKILL, the OOM killer, a crash of the interpreter) it cannot: its
watchdog, a small process started once per consumer process (``app.process_groups``),
does. The watchdog holds no secrets: it starts from a fresh interpreter with an
environment of ``PATH`` alone.

Each command's group is registered with the watchdog as soon as it is started; a command
that runs before its registration reaches the watchdog is found by its environment,
where ``TASKQ_WATCHDOG`` names its consumer's watchdog.

Why the end of a pipe rather than ``PR_SET_PDEATHSIG``: the kernel closes the pipe
whatever kills the consumer, while the parent-death signal follows the *thread* that
spawned the child (trio spawns from worker threads that come and go), and the pipe's
write end is close-on-exec, so no command holds it open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager

import anyio

from app import process_groups

log = logging.getLogger("taskq.watchdog")

# Seconds between the watchdog's SIGTERM and its SIGKILL: short, since a command whose
# consumer died may be running a second time elsewhere once its lease runs out.
WATCHDOG_GRACE = 1.0
MARK_VARIABLE = "TASKQ_WATCHDOG"
_EXIT_SECONDS = 5.0


class Watchdog:
    """The consumer's side of the pipe: tells the watchdog which groups to stop."""

    def __init__(self, pipe: int, mark: str) -> None:
        self._pipe: int | None = pipe
        """The write end of the watchdog's stdin, non-blocking; ``None`` once closed."""
        self.mark = mark
        """The value of ``TASKQ_WATCHDOG`` in the environment of guarded commands."""
        self._lock = anyio.Lock()
        self._lost = False

    def marked(self, env: Mapping[str, str]) -> Mapping[str, str]:
        """``env`` with this watchdog's mark, for a command it guards."""
        return {**env, MARK_VARIABLE: self.mark}

    async def guard(self, pgid: int) -> None:
        """Have the group stopped if this process dies before ``release(pgid)``."""
        await self._send(b"+%d\n" % pgid)

    async def release(self, pgid: int) -> None:
        """The group is empty (its run ended): forget it."""
        await self._send(b"-%d\n" % pgid)

    def close(self) -> None:
        """Close the pipe: the watchdog stops the groups still registered, and exits."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None

    async def _send(self, line: bytes) -> None:
        # Written straight to the pipe (a stream's write, drain and lock cost several
        # times more, twice per command). A line is shorter than PIPE_BUF, so each write
        # is whole or fails: lines from concurrent runs cannot interleave.
        while self._pipe is not None and not self._lost:
            try:
                os.write(self._pipe, line)
                return
            except BlockingIOError:
                # The watchdog reads every 50 ms: a full pipe means it is stuck or slow.
                async with self._lock:  # one task at a time waits on the descriptor
                    await anyio.wait_writable(self._pipe)
            except OSError:
                self._lost = True
                log.error("the watchdog is gone: commands would outlive a crash of this process")


@asynccontextmanager
async def watching_commands(grace: float = WATCHDOG_GRACE) -> AsyncGenerator[Watchdog]:
    """Start the watchdog, for the commands ``run_command`` is given it for.

    On exit the pipe is closed: the watchdog stops whatever is still registered (nothing,
    after an orderly stop) and exits.
    """
    mark = secrets.token_hex(16)
    # Run by path: the program needs the standard library only, and whatever sys.path
    # finds taskq here (PYTHONPATH, a venv) is ignored by -I.
    program = [process_groups.__file__, str(grace), f"{MARK_VARIABLE}={mark}"]
    pipe, write_end = os.pipe()
    try:
        process = await anyio.open_process(
            [sys.executable, "-I", *program],
            stdin=pipe,
            stdout=subprocess.PIPE,
            stderr=None,
            env={"PATH": os.defpath},
            # Out of the terminal's process group: Ctrl-C reaches the consumer only.
            start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(pipe)
    os.set_blocking(write_end, False)
    watchdog = Watchdog(write_end, mark)
    assert process.stdout is not None
    try:
        with anyio.fail_after(_EXIT_SECONDS):
            ready = await process.stdout.receive()
    except (anyio.EndOfStream, TimeoutError):
        ready = b""
    if ready != process_groups.READY:
        watchdog.close()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.aclose()
        raise RuntimeError("the command watchdog did not start (its error is above)")
    try:
        yield watchdog
    finally:
        with anyio.CancelScope(shield=True):
            watchdog.close()
            with anyio.move_on_after(_EXIT_SECONDS + grace):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await process.aclose()

"""Running one command as a child process group, with its output captured under a cap.

The command gets a session (process group) of its own, so that a timeout, a cancel or
the end of the main process can signal everything it started: SIGTERM to the group,
a grace period, then SIGKILL. Nothing it spawned outlives the run, nor the process
(``app.watchdog`` stops the groups of a process that dies without stopping them).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

import anyio
from anyio.abc import ByteReceiveStream, Process

from app.domain import Outcome
from app.process_groups import group_has_live_members, signal_group
from app.watchdog import Watchdog

# Settings of the server itself that a command must not see (secrets, and where to
# read them: ``app.config`` takes ``NAME_FILE`` for each).
SERVER_SECRETS = frozenset(
    {
        "TASKQ_API_TOKENS",
        "TASKQ_TOKEN",
        "REDIS_URL",
        "REDIS_ADDRESS",
        "AMQP_URL",
        "REDIS_MQ_URL",
        "TASKQ_API_TOKENS_FILE",
        "REDIS_URL_FILE",
        "AMQP_URL_FILE",
        "REDIS_MQ_URL_FILE",
    }
)
_READ_CHUNK = 65536
_GROUP_POLL = 0.02
_KILL_SETTLE = 1.0


class CappedOutput:
    """Keeps the first and the last bytes of a stream, at most ``limit`` in all.

    ``listener``, if given, sees every chunk as it arrives (live output).
    """

    def __init__(self, limit: int, *, listener: Callable[[bytes], None] | None = None) -> None:
        self._listener = listener
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0
        self.complete = anyio.Event()

    def append(self, chunk: bytes) -> None:
        if self._listener is not None:
            self._listener(chunk)
        self.total += len(chunk)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self._tail += chunk
            # Trim lazily so that a stream of small writes costs amortised O(1).
            if len(self._tail) > 2 * self._tail_limit:
                del self._tail[: len(self._tail) - self._tail_limit]

    @property
    def truncated(self) -> bool:
        return self.total > len(self._head) + min(len(self._tail), self._tail_limit)

    def text(self) -> str:
        tail = bytes(self._tail[-self._tail_limit :]) if self._tail_limit else b""
        if not self.truncated:
            return (bytes(self._head) + tail).decode(errors="replace")
        omitted = self.total - len(self._head) - len(tail)
        marker = f"\n[... {omitted} bytes of output omitted ...]\n"
        return bytes(self._head).decode(errors="replace") + marker + tail.decode(errors="replace")

    def outcome(
        self,
        *,
        started: float,
        exit_code: int | None = None,
        timed_out: bool = False,
        error: str | None = None,
    ) -> Outcome:
        """What the command produced: this output, and how it ended, ``started`` being
        the ``time.monotonic()`` at which it was started."""
        return Outcome(
            exit_code=exit_code,
            duration=time.monotonic() - started,
            output=self.text(),
            truncated=self.truncated,
            timed_out=timed_out,
            error=error,
        )


def inherited_environment() -> dict[str, str]:
    """The worker's environment without the server's secrets: what every command gets,
    before the task's own ``env``."""
    return {k: v for k, v in os.environ.items() if k not in SERVER_SECRETS}


async def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    time_limit: float | None,
    output: CappedOutput,
    watchdog: Watchdog | None = None,
    kill_grace: float = 5.0,
) -> Outcome:
    """Run ``argv`` to the end (or ``time_limit``) and report its exit code and output.

    Output is collected into ``output``, which the caller keeps: when the caller is
    cancelled, the process group is stopped before this returns, and ``output`` holds
    what the command printed until then. With a ``watchdog``, the command's group is
    guarded by it while it runs, in case this process dies without stopping it.
    """
    started = time.monotonic()
    try:
        process = await _start_session(argv, env=env, cwd=cwd, watchdog=watchdog)
    except (OSError, ValueError) as exc:
        # ValueError: a NUL byte in the argv, the environment or the cwd.
        return output.outcome(started=started, error=f"could not start the command: {exc}")

    timed_out = False
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdout is not None
            tg.start_soon(_collect, process.stdout, output)
            with anyio.move_on_after(time_limit if time_limit is not None else math.inf) as limit:
                await process.wait()
            timed_out = limit.cancelled_caught
            await _stop_group(process, kill_grace)
            # Everything in the group is gone, so the pipe is at its end; a process that
            # left the group on purpose must not hold the run open.
            with anyio.move_on_after(1.0):
                await output.complete.wait()
            tg.cancel_scope.cancel()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _stop_group(process, kill_grace)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
            if watchdog is not None:
                await watchdog.release(process.pid)

    returncode = process.returncode
    assert returncode is not None
    exit_code = 128 - returncode if returncode < 0 else returncode
    error = None
    if timed_out:
        error = f"timed out after {time_limit:g} s"
    elif returncode < 0:
        error = f"killed by {signal.Signals(-returncode).name}"
    return output.outcome(started=started, exit_code=exit_code, timed_out=timed_out, error=error)


async def _start_session(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None, watchdog: Watchdog | None
) -> Process:
    """Start ``argv`` as the leader of a new session, stdout and stderr on one pipe.

    Not cancellable: the child runs before ``open_process`` returns, and a cancel in
    between would leave its group with no one to stop it (asyncio kills only the leader).
    The caller takes the cancel at its next checkpoint, once it can stop the group.
    The group is registered with the ``watchdog`` at once, for the case where this
    process dies without stopping it.
    """
    process: Process | None = None
    with anyio.CancelScope(shield=True):
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env if watchdog is None else watchdog.marked(env),
            start_new_session=True,
        )
        if watchdog is not None:
            await watchdog.guard(process.pid)
    assert process is not None  # a shielded scope swallows no cancellation
    return process


async def _collect(stream: ByteReceiveStream, output: CappedOutput) -> None:
    try:
        while True:
            output.append(await stream.receive(_READ_CHUNK))
    except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    finally:
        output.complete.set()


async def _stop_group(process: Process, grace: float) -> None:
    """SIGTERM the process group, wait up to ``grace`` for it to empty, then SIGKILL it."""
    if not signal_group(process.pid, signal.SIGTERM):
        return
    with anyio.move_on_after(grace):
        await process.wait()
        await _wait_for_empty_group(process.pid)
        return
    signal_group(process.pid, signal.SIGKILL)
    await process.wait()
    # A killed process dies only once it is next scheduled: the leader's exit does not
    # mean the rest of the group is gone yet.
    with anyio.move_on_after(_KILL_SETTLE):
        await _wait_for_empty_group(process.pid)


async def _wait_for_empty_group(pgid: int) -> None:
    # Nothing notifies us when the last member of a group exits: poll.
    while group_has_live_members(pgid):  # noqa: ASYNC110
        await anyio.sleep(_GROUP_POLL)

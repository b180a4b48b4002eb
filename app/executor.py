"""Running one command as a child process group, with its output captured under a cap.

The command gets a session (process group) of its own, so that a timeout, a cancel or
the end of the main process can signal everything it started: SIGTERM to the group,
a grace period, then SIGKILL. Nothing it spawned outlives the run, nor the process
(``app.watchdog`` stops the groups of a process that dies without stopping them).

DESIGN.md has commands run through AnyIO's process API. On Linux this module departs
from it, for CPU: starting and waiting for commands was about a quarter of a consumer's
CPU per run. AnyIO's API (asyncio's subprocess transport) costs a protocol, pipe
transports, futures, a child watcher and a task group for each command. Here a command
is started with ``os.posix_spawn`` (``subprocess.Popen`` when it needs a working
directory or a search of ``PATH``, which ``posix_spawn`` lacks), and one task waits
for its output pipe and its exit (a pidfd) together, through an epoll set holding both:
no transport, no task group, no thread, on asyncio and trio alike. Measured side by
side on this project's 2-core machine (``python -m tests.bench.spawn_rate -n 500
--repeat 3``, asyncio, ``sh -c true``, concurrency 1 and 8, with and without the
watchdog): parent CPU per command 0.46-0.64 ms through AnyIO, 0.22-0.28 ms here
(0.44-0.51x); commands per second 1.15-1.3x (1.5-2.1x in a run while the machine was
busy with other work, CPU 0.39-0.44x). (On trio, AnyIO spawns from worker threads, which overlap the
wait for a child's exec: at concurrency 8 on a loaded machine that way started more
commands per second, for more CPU each. The service runs on asyncio.)
AnyIO's API remains the fallback where the kernel has no pidfd (before Linux 5.3, or
not Linux).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import signal
import subprocess
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import anyio
from anyio.abc import Process

from app.domain import Outcome
from app.metrics_directory import MULTIPROCESS_VARIABLE
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
        "TASKQ_WEBHOOK_SECRET",
        "TASKQ_WEBHOOK_SECRET_FILE",
    }
)
_READ_CHUNK = 65536
_GROUP_POLL = 0.02
_KILL_SETTLE = 1.0
# Once the group is gone, how long a process that left it may hold the output open.
_STRAY_OUTPUT_SECONDS = 1.0
# Signals Python ignores, which a command must start with at their default, as
# ``subprocess`` does (``restore_signals``): the writer of a closed pipe dies of SIGPIPE.
_RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


# The control characters JSON has no short escape for: each takes six bytes (``\u0000``)
# in a run's stored output.
_SIX_BYTE_ESCAPES = bytes(c for c in range(0x20) if c not in b"\b\t\n\f\r")


def stored_size(data: bytes) -> int:
    """What ``data`` weighs against the output limit: a byte each, but six for each
    control character stored as a six-byte escape, so that output of NUL bytes cannot
    make the stored run (and the memory that writes it) six times the limit."""
    escaped = len(data) - len(data.translate(None, _SIX_BYTE_ESCAPES))
    return len(data) + 5 * escaped


def _fitting(data: bytes, budget: int, *, from_end: bool = False) -> int:
    """How many bytes of ``data``, from its start (or its end), weigh at most ``budget``."""
    if len(data) * 6 <= budget or stored_size(data) <= budget:
        return len(data)
    # Binary search: a part's weight grows with its length. Only output heavy with
    # escaped control characters gets here.
    fits, too_long = 0, min(len(data), budget) + 1
    while too_long - fits > 1:
        length = (fits + too_long) // 2
        part = data[len(data) - length :] if from_end else data[:length]
        if stored_size(part) <= budget:
            fits = length
        else:
            too_long = length
    return fits


class CappedOutput:
    """Keeps the first and the last bytes of a stream, at most ``limit`` in all, as
    ``stored_size`` weighs them.

    ``listener``, if given, sees every chunk as it arrives (live output).
    """

    def __init__(self, limit: int, *, listener: Callable[[bytes], None] | None = None) -> None:
        self._listener = listener
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

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

    def _kept(self) -> tuple[bytes, bytes]:
        """The head and the tail that are stored, each within its half of the limit."""
        head = bytes(self._head)
        tail = bytes(self._tail[-self._tail_limit :]) if self._tail_limit else b""
        head = head[: _fitting(head, self._head_limit)]
        tail = tail[len(tail) - _fitting(tail, self._tail_limit, from_end=True) :]
        return head, tail

    @property
    def truncated(self) -> bool:
        head, tail = self._kept()
        return self.total > len(head) + len(tail)

    def text(self) -> str:
        return self._text(*self._kept())

    def _text(self, head: bytes, tail: bytes) -> str:
        omitted = self.total - len(head) - len(tail)
        if not omitted:
            return (head + tail).decode(errors="replace")
        marker = f"\n[... {omitted} bytes of output omitted ...]\n"
        return head.decode(errors="replace") + marker + tail.decode(errors="replace")

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
        head, tail = self._kept()
        return Outcome(
            exit_code=exit_code,
            duration=time.monotonic() - started,
            output=self._text(head, tail),
            truncated=self.total > len(head) + len(tail),
            timed_out=timed_out,
            error=error,
        )


def inherited_environment() -> dict[str, str]:
    """The worker's environment without the server's secrets, nor its metrics directory
    (a command using prometheus_client would write its own metrics there): what every
    command gets, before the task's own ``env``."""
    hidden = {*SERVER_SECRETS, MULTIPROCESS_VARIABLE}
    return {k: v for k, v in os.environ.items() if k not in hidden}


def _kernel_has_pidfd() -> bool:
    """Whether a process's exit can be awaited through a pidfd in an epoll set here."""
    if not hasattr(select, "epoll"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


WAIT_THROUGH_PIDFD = _kernel_has_pidfd()
"""Whether commands are started and awaited through a pidfd (else through AnyIO's process
API). Tests and ``tests.bench.spawn_rate`` switch it to run both ways."""


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
        command = await _start_session(argv, env=env, cwd=cwd, output=output, watchdog=watchdog)
    except (OSError, ValueError) as exc:
        # ValueError: a NUL byte in the argv, the environment or the cwd.
        return output.outcome(started=started, error=f"could not start the command: {exc}")

    timed_out = False
    try:
        async with command.collecting_output():
            with anyio.move_on_after(time_limit if time_limit is not None else math.inf) as limit:
                await command.wait()
            timed_out = limit.cancelled_caught
            await _stop_group(command, kill_grace)
            # Everything in the group is gone, so the pipe is at its end; a process that
            # left the group on purpose must not hold the run open.
            await command.read_to_end(within=_STRAY_OUTPUT_SECONDS)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _stop_group(command, kill_grace)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await command.aclose()
            if watchdog is not None:
                await watchdog.release(command.pid)
    return _ending(output, started, command.returncode, time_limit=time_limit, timed_out=timed_out)


def _ending(
    output: CappedOutput,
    started: float,
    returncode: int | None,
    *,
    time_limit: float | None,
    timed_out: bool,
) -> Outcome:
    """The outcome of a command whose leader exited with ``returncode`` (negative: the
    signal that killed it, reported as a shell would, 128 + its number)."""
    assert returncode is not None
    exit_code = 128 - returncode if returncode < 0 else returncode
    error = None
    if timed_out:
        error = f"timed out after {time_limit:g} s"
    elif returncode < 0:
        error = f"killed by {signal.Signals(-returncode).name}"
    return output.outcome(started=started, exit_code=exit_code, timed_out=timed_out, error=error)


class _Command(Protocol):
    """A started command, as ``run_command`` drives it, whichever way it was started."""

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group's id."""
        ...

    @property
    def returncode(self) -> int | None:
        """The leader's exit status once it has exited (negative: killed by that signal)."""
        ...

    def collecting_output(self) -> AbstractAsyncContextManager[None]:
        """The scope within which output is collected while the other methods wait."""
        ...

    async def wait(self) -> None:
        """Until the leader has exited."""

    async def pause(self, seconds: float) -> None:
        """Let ``seconds`` pass (output keeps being collected)."""

    async def read_to_end(self, *, within: float) -> None:
        """Until the end of the output (every process holding the pipe has closed it),
        for ``within`` seconds at most."""

    async def aclose(self) -> None:
        """Release the command's descriptors (reaping the leader, if not yet done)."""


async def _start_session(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    output: CappedOutput,
    watchdog: Watchdog | None,
) -> _Command:
    """Start ``argv`` as the leader of a new session, stdout and stderr on one pipe.

    Not cancellable: the child runs before the start returns, and a cancel in between
    would leave its group with no one to stop it. The caller takes the cancel at its
    next checkpoint, once it can stop the group. The group is registered with the
    ``watchdog`` at once, for the case where this process dies without stopping it.
    """
    if not argv:
        raise ValueError("no program to run")
    if watchdog is not None:
        env = watchdog.marked(env)
    command: _Command | None = None
    with anyio.CancelScope(shield=True):
        if WAIT_THROUGH_PIDFD:
            command = _PidfdCommand.start(argv, env=env, cwd=cwd, output=output)
        else:
            command = await _AnyioCommand.start(argv, env=env, cwd=cwd, output=output)
        if watchdog is not None:
            await watchdog.guard(command.pid)
    assert command is not None  # a shielded scope swallows no cancellation
    return command


class _PidfdCommand:
    """A command whose output pipe (non-blocking) and exit (a pidfd) sit in one epoll
    set, so that the task running it waits for whichever comes first, and collects the
    output whenever it waits."""

    def __init__(
        self,
        leader: subprocess.Popen[bytes] | int,
        *,
        pidfd: int,
        pipe: int,
        events: select.epoll,
        output: CappedOutput,
    ) -> None:
        self._popen = leader if isinstance(leader, subprocess.Popen) else None
        self.pid = _pid_of(leader)
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._pipe: int | None = pipe
        self._events = events
        """Holds the pipe until its end, and the pidfd until the leader is reaped."""
        self._output = output

    @classmethod
    def start(
        cls, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None, output: CappedOutput
    ) -> _PidfdCommand:
        with contextlib.ExitStack() as undo:  # what to undo if a step fails
            events = select.epoll()
            undo.callback(events.close)
            pipe, write_end = os.pipe2(os.O_CLOEXEC)
            undo.callback(os.close, pipe)
            try:
                leader = _spawn_leader(argv, env=env, cwd=cwd, stdout=write_end)
            finally:
                os.close(write_end)
            undo.callback(_kill_unwatched, leader)
            pidfd = os.pidfd_open(_pid_of(leader))
            undo.callback(os.close, pidfd)
            os.set_blocking(pipe, False)
            events.register(pipe, select.EPOLLIN)
            events.register(pidfd, select.EPOLLIN)
            undo.pop_all()
        return cls(leader, pidfd=pidfd, pipe=pipe, events=events, output=output)

    def collecting_output(self) -> AbstractAsyncContextManager[None]:
        # Every wait below collects the output: nothing to run beside them.
        return contextlib.nullcontext()

    async def wait(self) -> None:
        while self.returncode is None:
            await self._handle_events()

    async def pause(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            while True:
                await self._handle_events()

    async def read_to_end(self, *, within: float) -> None:
        if self._pipe is not None:  # else the usual case: the pipe ended with the leader
            with anyio.move_on_after(within):
                await self._read_until_the_end()

    async def _read_until_the_end(self) -> None:
        while self._pipe is not None:
            await self._handle_events()

    async def aclose(self) -> None:
        if self.returncode is None:
            # Only when its group could not be signalled: a zombie, or nearly one.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
            await self.wait()
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        os.close(self._pidfd)
        self._events.close()

    async def _handle_events(self) -> None:
        await anyio.wait_readable(self._events.fileno())
        for fd, _ in self._events.poll(0):
            if fd == self._pipe:
                self._read()
            elif fd == self._pidfd:
                self._reap()

    def _read(self) -> None:
        assert self._pipe is not None
        try:
            chunk = os.read(self._pipe, _READ_CHUNK)
        except BlockingIOError:
            return
        if chunk:
            self._output.append(chunk)
            return
        self._events.unregister(self._pipe)
        os.close(self._pipe)
        self._pipe = None

    def _reap(self) -> None:
        self._events.unregister(self._pidfd)
        if self._popen is not None:
            self.returncode = self._popen.wait()
        else:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def _spawn_leader(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None, stdout: int
) -> subprocess.Popen[bytes] | int:
    """Start ``argv`` in a new session, stdin ``/dev/null``, stdout and stderr on
    ``stdout``: with ``posix_spawn`` (its pid) when it can, else with ``Popen``.

    ``posix_spawn`` has no working directory and searches the parent's ``PATH``, not the
    command's: ``Popen`` does both, for about a third more CPU per command.
    """
    if cwd is None and os.sep in argv[0]:
        _stop_inheriting_descriptors()
        return os.posix_spawn(
            argv[0],
            list(argv),
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, _null_stdin(), 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stdout, 2),
            ],
            setsid=True,
            setsigdef=_RESTORED_SIGNALS,
        )
    return subprocess.Popen(
        argv,
        stdin=_null_stdin(),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )


def _pid_of(leader: subprocess.Popen[bytes] | int) -> int:
    return leader if isinstance(leader, int) else leader.pid


def _kill_unwatched(leader: subprocess.Popen[bytes] | int) -> None:
    """Kill and reap a leader that cannot be awaited (no pidfd for it, say): it has only
    just started, so SIGKILL ends its group at once, and the blocking wait is short."""
    signal_group(_pid_of(leader), signal.SIGKILL)
    if isinstance(leader, int):
        os.waitpid(leader, 0)
    else:
        leader.wait()


@functools.cache
def _null_stdin() -> int:
    """``/dev/null`` for every command's stdin, opened once (``Popen`` opens it and closes
    it again for each command)."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


@functools.cache
def _stop_inheriting_descriptors() -> None:
    """Make the descriptors this process inherited when it started non-inheritable, once.

    ``posix_spawn`` has no ``close_fds``: a command would get every inheritable
    descriptor, say a pipe of whatever started the consumer, and hold it open. Every
    descriptor Python opens is non-inheritable already (PEP 446).
    """
    for name in os.listdir("/proc/self/fd"):
        descriptor = int(name)
        if descriptor > 2:
            # The listing's own descriptor is closed by now.
            with contextlib.suppress(OSError):
                os.set_inheritable(descriptor, False)


class _AnyioCommand:
    """The fallback where there is no pidfd: AnyIO's process API, with a task of its own
    collecting the output."""

    def __init__(self, process: Process, output: CappedOutput) -> None:
        self._process = process
        self._output = output
        self._output_ended = anyio.Event()

    @classmethod
    async def start(
        cls, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None, output: CappedOutput
    ) -> _AnyioCommand:
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        return cls(process, output)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @asynccontextmanager
    async def collecting_output(self) -> AsyncGenerator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._collect)
            yield
            tg.cancel_scope.cancel()

    async def wait(self) -> None:
        await self._process.wait()

    async def pause(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    async def read_to_end(self, *, within: float) -> None:
        with anyio.move_on_after(within):
            await self._output_ended.wait()

    async def aclose(self) -> None:
        await self._process.aclose()

    async def _collect(self) -> None:
        assert self._process.stdout is not None
        try:
            while True:
                self._output.append(await self._process.stdout.receive(_READ_CHUNK))
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            self._output_ended.set()


async def _stop_group(command: _Command, grace: float) -> None:
    """SIGTERM the process group, wait up to ``grace`` for it to empty, then SIGKILL it."""
    if not signal_group(command.pid, signal.SIGTERM):
        return
    with anyio.move_on_after(grace):
        await command.wait()
        await _wait_for_empty_group(command)
        return
    signal_group(command.pid, signal.SIGKILL)
    await command.wait()
    # A killed process dies only once it is next scheduled: the leader's exit does not
    # mean the rest of the group is gone yet.
    with anyio.move_on_after(_KILL_SETTLE):
        await _wait_for_empty_group(command)


async def _wait_for_empty_group(command: _Command) -> None:
    # Nothing notifies us when the last member of a group exits: poll.
    while group_has_live_members(command.pid):
        await command.pause(_GROUP_POLL)

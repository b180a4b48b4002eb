"""``taskq serve --processes N``: the consumer role as N processes of its own, so that
one ``taskq serve`` uses every core.

The main process keeps the other roles (api, scheduler) and supervises its consumer
processes, each a ``taskq serve`` playing the consumer role alone, with its own watchdog:

- **Settings and secrets** reach a consumer process the way they reached its parent:
  through a pipe read once at start (``app.startup``), never through its argv or its
  environment, where the commands it runs could read them.
- **Stopping.** The parent asks for an orderly stop by closing the process's stdin, and
  the consumer process drains as it does on SIGTERM. A pipe rather than a forwarded
  SIGTERM: its end is also what the kernel delivers when the parent dies, however it
  dies (SIGKILL included), so no consumer process runs on unsupervised; and a consumer
  process that got the orchestrator's SIGTERM as well (systemd signals a whole cgroup)
  must not take its parent's request for a second signal, which means "stop now".
- **Crashes.** A consumer process that exits while the service runs is a crashed role
  (``role consumer-2 crashed``): the service stops with a non-zero exit, for the
  orchestrator to restart it.
- **Ready.** A consumer process writes one line to its stdout once it consumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import replace

import anyio
from anyio.abc import Process
from anyio.abc import TaskStatus as StartedStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from app.config import Settings
from app.event_loops import running_backend
from app.metrics import process_exited
from app.startup import (
    HANDOVER_VARIABLE,
    environment_without_secrets,
    handover_pipe,
    own_command,
)

# The hidden ``taskq serve`` flag of a consumer process: its stdin and stdout are its
# parent's pipes.
SUPERVISED_FLAG = "--supervised"
_READY_LINE_LIMIT = 4096


class ConsumerProcessExited(Exception):
    """A consumer process exited while the service ran, or failed to stop in order."""


async def run_consumer_process(
    settings: Settings,
    stopping: anyio.Event,
    *,
    stop_within: float,
    task_status: StartedStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run one consumer process with ``settings`` until ``stopping`` is set and it has
    drained; reports its pid once it consumes. Raises ``ConsumerProcessExited`` when it
    exits otherwise. However this ends, the process is gone after at most
    ``stop_within`` seconds (killed then: its watchdog stops its commands)."""
    process = await _start(settings)
    try:
        async with anyio.create_task_group() as watching:
            watching.start_soon(_ask_to_stop_when_set, stopping, process)
            if await _ready(process):
                task_status.started(process.pid)
            await process.wait()
            watching.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(process, stop_within)
        process_exited(process.pid)
    code = process.returncode
    if code != 0 or not stopping.is_set():
        raise ConsumerProcessExited(f"process {process.pid} {describe_exit(code)}")


def describe_exit(code: int | None) -> str:
    """How a process ended, from its return code, in words."""
    if code is None:
        return "did not stop"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


async def _start(settings: Settings) -> Process:
    own = replace(
        settings,
        roles=("consumer",),
        processes=1,
        concurrency=settings.commands_per_process(),
        api_tokens=(),
        webhook_secret=None,  # notifications are the scheduler role's
        metrics_port=None,  # its metrics are scraped through its parent's /metrics
    )
    read_end = handover_pipe(own.as_env())
    try:
        env = environment_without_secrets(os.environ)
        env[HANDOVER_VARIABLE] = str(read_end)
        return await anyio.open_process(
            [*own_command(), "serve", "--backend", running_backend(), SUPERVISED_FLAG],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            pass_fds=(read_end,),
        )
    finally:
        os.close(read_end)


async def _ready(process: Process) -> bool:
    """Whether the process reported ready (rather than exiting before)."""
    assert process.stdout is not None
    lines = BufferedByteReceiveStream(process.stdout)
    try:
        await lines.receive_until(b"\n", _READY_LINE_LIMIT)
    except (anyio.IncompleteRead, anyio.DelimiterNotFound):
        return False
    return True


async def _ask_to_stop_when_set(stopping: anyio.Event, process: Process) -> None:
    await stopping.wait()
    assert process.stdin is not None
    await process.stdin.aclose()


async def _stop(process: Process, stop_within: float) -> None:
    """Ask ``process`` to stop (if it still runs), and kill it if it does not in time."""
    assert process.stdin is not None
    with anyio.move_on_after(stop_within):
        await process.stdin.aclose()
        await process.wait()
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await process.aclose()


# --------------------------------------------------------------------------- the child


async def parent_gone() -> None:
    """Return once the parent ``taskq serve`` closed this consumer process's stdin:
    asked it to stop, or died."""
    stdin = sys.stdin.fileno()
    while True:
        await anyio.wait_readable(stdin)
        if not os.read(stdin, 512):
            return


def report_ready(description: str) -> None:
    """Tell the parent ``taskq serve`` that this consumer process consumes."""
    sys.stdout.write(description + "\n")
    sys.stdout.flush()

"""The first moments of a ``taskq serve``/``taskq dev`` process, before anything is imported.

Two things must happen before the service's (slow) imports:

- **Stop signals are held, not fatal.** A SIGINT or SIGTERM that arrives while the
  process starts is recorded, and the service stops in order as soon as it can
  (exit code 0), as it would once running. A second one stops the process at once.
- **Secrets leave the process's environment and command line.** The kernel shows a
  process's initial environment and argv in ``/proc/PID/environ`` and
  ``/proc/PID/cmdline``, and commands the consumer runs can read those of their parent.
  So when a secret is in either, the process re-executes itself without them and gets
  them through an inherited pipe, read once and closed. The process is also made
  non-dumpable, which keeps other non-root processes of the same user out of its
  ``/proc/PID/environ`` and memory (root keeps ``CAP_SYS_PTRACE`` and can read both).

Standard library only: this runs before everything else.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence

# Settings that carry secrets, as environment variables (``app.config`` reads them).
SECRET_VARIABLES = (
    "TASKQ_API_TOKENS",
    "TASKQ_TOKEN",
    "REDIS_URL",
    "AMQP_URL",
    "REDIS_MQ_URL",
    "TASKQ_WEBHOOK_SECRET",
)
# Command-line flags that carry them, and the variable each stands for.
SECRET_FLAGS = {"--redis-url": "REDIS_URL", "--amqp-url": "AMQP_URL", "--token": "TASKQ_TOKEN"}
SERVICE_COMMANDS = ("serve", "dev")
HANDOVER_VARIABLE = "TASKQ_SECRETS_FD"
_GLOBAL_OPTIONS_WITH_VALUE = ("--api-url", "--token")
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_PIPE_CAPACITY = 65536
_PR_SET_DUMPABLE = 4

_handed_over: dict[str, str] = {}
_stop_requests: list[signal.Signals] = []


def prepare_service_process(argv: Sequence[str]) -> None:
    """For ``taskq serve``/``taskq dev`` (``argv`` as ``sys.argv``): hold stop signals,
    take secrets out of the environment and argv (re-executing if needed), and make the
    process non-dumpable. Does nothing for other commands."""
    if service_command(argv[1:]) is None:
        return
    # Blocked signals stay blocked, and pending, across the re-execution.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    if (handover := os.environ.pop(HANDOVER_VARIABLE, None)) is not None:
        _handed_over.update(_receive(int(handover)))
    else:
        stripped_argv, secrets = split_secrets(argv, os.environ)
        if secrets:
            _reexecute(stripped_argv, secrets)
    _make_undumpable()
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _record_stop_request)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def service_environment() -> dict[str, str]:
    """The environment to read settings from: ``os.environ`` with the secrets handed
    over at start (flags such as ``--redis-url`` included, as their variable)."""
    return {**os.environ, **_handed_over}


def stop_requested() -> signal.Signals | None:
    """The stop signal received while the process started, if any."""
    return _stop_requests[0] if _stop_requests else None


def service_command(args: Sequence[str]) -> str | None:
    """``serve`` or ``dev`` when ``args`` (without the program) run one, else ``None``."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            index += 2
        elif arg.startswith("-"):
            index += 1
        else:
            return arg if arg in SERVICE_COMMANDS else None
    return None


def split_secrets(
    argv: Sequence[str], environ: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """``argv`` without secret flags, and the secrets found in ``environ`` and in those
    flags (a flag wins over its variable, as it does for the settings)."""
    secrets = {name: environ[name] for name in SECRET_VARIABLES if name in environ}
    kept: list[str] = [argv[0]]
    index = 1
    while index < len(argv):
        flag, equals, value = argv[index].partition("=")
        if flag in SECRET_FLAGS and equals:
            secrets[SECRET_FLAGS[flag]] = value
            index += 1
        elif flag in SECRET_FLAGS and index + 1 < len(argv):
            secrets[SECRET_FLAGS[flag]] = argv[index + 1]
            index += 2
        else:
            kept.append(argv[index])
            index += 1
    return kept, secrets


def handover_pipe(secrets: Mapping[str, str]) -> int:
    """The read end of a pipe holding ``secrets`` (as the variables they stand for),
    for a process started with ``HANDOVER_VARIABLE`` naming it: it reads them at start
    (``prepare_service_process``). Close it once the process is started."""
    payload = json.dumps(secrets).encode()
    if len(payload) > _PIPE_CAPACITY:
        raise SystemExit("taskq: secrets too large to hand over: give them as NAME_FILE")
    read_end, write_end = os.pipe()
    os.write(write_end, payload)
    os.close(write_end)
    return read_end


def environment_without_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the secrets' variables, nor the ``NAME_FILE`` variables that
    stand for them (a secret handed over and its file would be refused together)."""
    hidden = {*SECRET_VARIABLES, *(f"{name}_FILE" for name in SECRET_VARIABLES)}
    return {k: v for k, v in environ.items() if k not in hidden}


def own_command() -> list[str]:
    """How this process was started, up to its arguments: the interpreter, its options
    and the program (``taskq``'s script, or ``-m cli``)."""
    return sys.orig_argv[: len(sys.orig_argv) - len(sys.argv) + 1]


def _reexecute(argv: Sequence[str], secrets: Mapping[str, str]) -> None:
    read_end = handover_pipe(secrets)
    os.set_inheritable(read_end, True)
    environ = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    environ[HANDOVER_VARIABLE] = str(read_end)
    try:
        os.execve(sys.executable, [*own_command(), *argv[1:]], environ)
    except OSError as exc:
        raise SystemExit(f"taskq: cannot restart without its secrets in view: {exc}") from None


def _receive(fd: int) -> dict[str, str]:
    chunks: list[bytes] = []
    while chunk := os.read(fd, _PIPE_CAPACITY):
        chunks.append(chunk)
    os.close(fd)
    secrets: dict[str, str] = json.loads(b"".join(chunks))
    return secrets


def _make_undumpable() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: nothing to hide in /proc


def _record_stop_request(signum: int, frame: object) -> None:
    if _stop_requests:
        # The second one while starting: stop now, as without taskq's handler.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _stop_requests.append(signal.Signals(signum))

"""Signalling process groups, and the watchdog program that stops them when their
consumer process dies.

Only the standard library here: ``python app/process_groups.py GRACE MARK`` is the
watchdog, a small process each consumer process starts once (see ``app.watchdog``). It
reads ``+PGID`` and ``-PGID`` lines on its stdin: the groups of the commands that
consumer is running. When its stdin reaches its end, the consumer is gone, however it
died (SIGKILL included: the kernel closes the pipe): the watchdog sends SIGTERM to every
group still listed, and to the group of every process whose environment holds ``MARK``
(a command started just before the consumer died, not registered yet), SIGKILL after
``GRACE`` seconds, and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator

_POLL_SECONDS = 0.02
READY = b"ready\n"
# The watchdog reads what accumulated in its pipe at most this often: waking for every
# command started costs the consumer's commands CPU, and nothing is urgent until EOF.
_READ_PAUSE_SECONDS = 0.05


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the group; ``False`` when no process is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A zombie leader on some kernels; the group is as good as gone.
        return False
    return True


def group_has_live_members(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies awaiting their reaper
    do not count: they hold no resources and cannot write output)."""
    if not signal_group(pgid, 0):
        return False
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return True
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def stop_groups(groups: Iterable[int], grace: float) -> None:
    """SIGTERM every group, wait up to ``grace`` seconds for them to empty, SIGKILL the
    rest. Blocking: this is the watchdog's last act, with nothing else to do meanwhile."""
    live = [pgid for pgid in groups if signal_group(pgid, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        live = [pgid for pgid in live if group_has_live_members(pgid)]
    for pgid in live:
        signal_group(pgid, signal.SIGKILL)


def read_registrations(lines: Iterable[bytes]) -> set[int]:
    """The groups still registered once ``lines`` ends (``+PGID`` adds, ``-PGID`` removes)."""
    groups: set[int] = set()
    for line in lines:
        sign, pgid = line[:1], int(line[1:])
        if sign == b"+":
            groups.add(pgid)
        else:
            groups.discard(pgid)
    return groups


def read_lines(fd: int) -> Iterator[bytes]:
    """The lines written to ``fd`` until its end, read in batches."""
    pending = b""
    while chunk := os.read(fd, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines
        time.sleep(_READ_PAUSE_SECONDS)


def marked_groups(mark: bytes) -> set[int]:
    """The groups of the processes whose initial environment holds ``mark`` (a
    ``NAME=VALUE`` entry)."""
    groups: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as environ:
                if mark not in environ.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        groups.add(int(stat[stat.rindex(b")") + 2 :].split()[2]))
    return groups


def main(argv: list[str]) -> None:
    # The consumer handles Ctrl-C and hangups; the watchdog outlives them until the
    # consumer itself is gone, so that it can clean up after the consumer's own stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    grace, mark = float(argv[0]), os.fsencode(argv[1])
    os.write(sys.stdout.fileno(), READY)
    registered = read_registrations(read_lines(sys.stdin.fileno()))
    stop_groups(registered | marked_groups(mark), grace)


if __name__ == "__main__":
    main(sys.argv[1:])

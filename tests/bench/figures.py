"""What the benchmarks measure with: percentiles, and a process's memory and CPU time
from /proc."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from tests.processes import children


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, as ``../shared/peers`` computes it (so figures compare)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def spread(values: Sequence[float], unit: str = "ms") -> str:
    """``p50 … p99 … max …`` of ``values``, one decimal."""
    return (
        f"p50 {percentile(values, 50):.1f} {unit}, p99 {percentile(values, 99):.1f} {unit}, "
        f"max {max(values):.1f} {unit}"
    )


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A ``/proc/PID/status`` memory figure (``VmRSS``, ``VmHWM``), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise LookupError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> None:
    """Make ``VmHWM`` start again from the current RSS (Linux: ``clear_refs`` 5), so that
    a peak read later is the peak of what happened since, not of start-up."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def family(root: int) -> list[int]:
    """``root`` and its descendants running the same executable (a supervisor's worker
    processes, the watchdog; not the commands they run), from /proc."""
    executable = _executable(root)
    found, todo = [root], [root]
    while todo:
        for child in children(todo.pop()):
            if _executable(child) == executable:
                found.append(child)
            todo.append(child)
    return found


def _executable(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""What ``/proc`` counts CPU time in, per second."""


@dataclass(frozen=True)
class CpuTicks:
    """A process's CPU time so far, in clock ticks (``/proc/PID/stat``)."""

    own: int
    """utime + stime: the process itself, every thread of it."""
    reaped: int
    """cutime + cstime: its children, once waited for (never one still running)."""
    started: int
    """Start time since boot: tells the process from a later one given the same pid."""


def parse_stat(text: str) -> CpuTicks:
    """``/proc/PID/stat`` as ``CpuTicks``; the name in parentheses may hold anything, so
    the fields are counted from its last ``)``."""
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime..cstime are fields 14..17, starttime 22.
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return CpuTicks(own=utime + stime, reaped=cutime + cstime, started=int(fields[19]))


def cpu_ticks(pid: int) -> CpuTicks | None:
    """``pid``'s CPU time so far, ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return parse_stat(stat.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def machine_busy_ticks() -> int:
    """Clock ticks every core of the machine spent busy since boot (``/proc/stat``: user,
    nice, system, irq, softirq; not idle, iowait or steal)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (
            int(value) for value in stat.readline().split()[1:8]
        )
    return user + nice + system + irq + softirq


def argv(pid: int) -> tuple[str, ...]:
    """``pid``'s command line, empty once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return tuple(part.decode(errors="replace") for part in cmdline.read().split(b"\0")[:-1])
    except (FileNotFoundError, ProcessLookupError):
        return ()


def parent_of(pid: int) -> int:
    """``pid``'s parent (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def named(comm: str) -> list[int]:
    """Every running process whose name (``/proc/PID/comm``) is ``comm``."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as name:
                    if name.read().strip() == comm:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return sorted(found)

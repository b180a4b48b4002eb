"""What the benchmarks measure with: percentiles, and a process's memory from /proc."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

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

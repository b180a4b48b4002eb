"""A task's recurrence in plain words, as the dashboard and ``taskq get`` show it.

Cron expressions are put in words by ``cron-descriptor`` (which reads a 6-field expression
as taskq does: a leading seconds field); intervals in the largest whole unit.
"""

from __future__ import annotations

import functools

from cron_descriptor import ExpressionDescriptor, Options  # pyright: ignore[reportMissingTypeStubs]

from app.domain import Recurrence

_UNITS = [(3600, "hour"), (60, "minute"), (1, "second")]


def describe_schedule(recurrence: Recurrence | None) -> str | None:
    """``"At 09:00, Monday through Friday (Europe/Berlin)"``, ``"Every 5 minutes"``;
    ``None`` without a recurrence."""
    if recurrence is None:
        return None
    if recurrence.cron is not None:
        return describe_cron(recurrence.cron, recurrence.timezone)
    if recurrence.every is not None:
        return describe_interval(recurrence.every)
    return None


@functools.lru_cache(maxsize=1024)
def describe_cron(expression: str, timezone: str) -> str:
    """A cron expression in words, with the time zone it is read in."""
    options = Options()
    options.use_24hour_time_format = True
    try:
        words = str(ExpressionDescriptor(expression, options).get_description())
    # The library raises its own errors (and others) on what it does not understand; the
    # expression is valid (cronsim parsed it), so it is shown as it is.
    except Exception:
        words = f"cron {expression}"
    return f"{words} ({timezone})"


def describe_interval(seconds: float) -> str:
    """``"Every 2 hours"``, ``"Every minute"``, ``"Every 90 seconds"``."""
    for size, unit in _UNITS:
        if seconds % size == 0:
            count = int(seconds // size)
            return f"Every {unit}" if count == 1 else f"Every {count} {unit}s"
    return f"Every {seconds:g} seconds"

"""How a taskq process writes its log: lines of text, or one JSON object a line
(``TASKQ_LOG_FORMAT=json``) naming the task and run a line is about.

A line is about a task and a run when its call passes them (``extra=about(...)``, where
a role handles many at once, as a scheduler's batch), or when it is logged while a run
is being handled (``handling(...)``, around everything a consumer does for one run:
whatever it calls logs the ids too).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Generator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

import msgspec

LOG_FORMATS = ("text", "json")

_handled: ContextVar[dict[str, str] | None] = ContextVar("taskq_log_ids", default=None)
_ID_FIELDS = ("task_id", "run_id")


def about(task_id: str, run_id: str | None = None) -> dict[str, str]:
    """The ``extra`` of a log call about a task, and one of its runs."""
    return {"task_id": task_id} if run_id is None else {"task_id": task_id, "run_id": run_id}


@contextmanager
def handling(task_id: str, run_id: str) -> Generator[None]:
    """Every line logged inside (in this task and those it starts) is about this run."""
    token = _handled.set(about(task_id, run_id))
    try:
        yield
    finally:
        _handled.reset(token)


class AddHandledIds(logging.Filter):
    """Gives a record the ids of the run being handled, unless its call passed its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "task_id") and (ids := _handled.get()):
            record.__dict__.update(ids)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (RFC 3339, UTC), ``level``, ``logger``,
    ``message``, ``process``, then ``task_id``/``run_id`` and ``exception`` (the
    traceback) when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        line.update({name: getattr(record, name) for name in _ID_FIELDS if hasattr(record, name)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return msgspec.json.encode(line).decode()


def configure_logging(log_format: str, *, supervised: bool = False) -> None:
    """Send every log record of this process (taskq's, Hypercorn's, the libraries')
    to stderr in ``log_format``, from level INFO. ``supervised``: a consumer process,
    which shares its parent's stderr (a text line then names its pid)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(AddHandledIds())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        name = "%(name)s[%(process)d]" if supervised else "%(name)s"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.captureWarnings(True)

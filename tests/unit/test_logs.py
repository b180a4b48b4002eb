"""The JSON log format: one object a line, with the ids of the task and run a line is
about, passed by the call or taken from the run being handled."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import anyio
import pytest

from app.logs import AddHandledIds, JsonFormatter, about, handling

log = logging.getLogger("taskq.test")


@pytest.fixture
def lines() -> Any:
    """The JSON lines ``log`` writes while a test runs, decoded."""
    written: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(AddHandledIds())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in written]
    log.removeHandler(handler)


def test_a_line_has_its_time_level_logger_and_message(lines: Any) -> None:
    log.warning("hello %s", "world")
    [line] = lines()
    assert {k: line[k] for k in ("level", "logger", "message")} == {
        "level": "WARNING",
        "logger": "taskq.test",
        "message": "hello world",
    }
    assert line["time"].endswith("Z")
    assert datetime.fromisoformat(line["time"]).utcoffset() is not None
    assert "task_id" not in line and "exception" not in line


def test_ids_passed_by_the_call_and_an_exception_are_fields(lines: Any) -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("failed", extra=about("t1", "r1"))
    [line] = lines()
    assert (line["task_id"], line["run_id"]) == ("t1", "r1")
    assert line["exception"].startswith("Traceback")
    assert "ValueError: bad\nthing" in line["exception"]


async def test_every_line_logged_while_a_run_is_handled_names_it(lines: Any) -> None:
    async def child() -> None:
        log.info("in a task started while handling")

    with handling("t2", "r2"):
        log.info("handling")
        log.info("about another", extra=about("t3"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
    log.info("after")
    ids = [(line.get("task_id"), line.get("run_id")) for line in lines()]
    assert ids == [("t2", "r2"), ("t3", None), ("t2", "r2"), (None, None)]

"""Reading tasks for ``taskq create --from`` and cutting them into requests."""

from __future__ import annotations

import json

import pytest

from app.schemas import MAX_BULK_TASKS
from cli.bulk import BATCH_BYTES, batches, read_tasks


def test_json_lines_are_read_one_task_a_line_skipping_blank_lines() -> None:
    text = '{"name": "a"}\n\n  \n{"name": "b"}\n'

    assert read_tasks(text) == [{"name": "a"}, {"name": "b"}]


def test_a_json_array_is_read_whole() -> None:
    assert read_tasks(' [{"name": "a"},\n {"name": "b"}]') == [{"name": "a"}, {"name": "b"}]


def test_a_line_that_is_not_json_is_named() -> None:
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_tasks('{"name": "a"}\n{"name": \n')


def test_batches_hold_at_most_the_servers_limit_in_order() -> None:
    tasks = [{"name": str(n)} for n in range(2 * MAX_BULK_TASKS + 5)]

    cut = list(batches(tasks))

    assert [(first, len(batch)) for first, batch in cut] == [
        (0, MAX_BULK_TASKS),
        (MAX_BULK_TASKS, MAX_BULK_TASKS),
        (2 * MAX_BULK_TASKS, 5),
    ]
    assert [task for _, batch in cut for task in batch] == tasks


def test_batches_stay_under_the_body_limit_and_a_huge_task_goes_alone() -> None:
    big = {"name": "big", "command": "x" * (BATCH_BYTES // 3)}
    huge = {"name": "huge", "command": "x" * BATCH_BYTES}
    tasks = [big, big, big, huge, big]

    cut = list(batches(tasks))

    assert [(first, len(batch)) for first, batch in cut] == [(0, 2), (2, 1), (3, 1), (4, 1)]
    for _, batch in cut[:-2]:
        assert len(json.dumps({"tasks": batch})) < BATCH_BYTES + 100

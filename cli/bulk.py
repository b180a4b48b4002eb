"""Reading many tasks from a file and cutting them into requests for ``POST /bulk/tasks``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from app.schemas import MAX_BULK_TASKS

BATCH_BYTES = 900_000
"""JSON bytes of tasks one request carries at most: under the server's 1 MiB body limit
with room to spare, so that a batch of large tasks is not refused whole."""


def read_tasks(text: str) -> list[Any]:
    """The task bodies in ``text``: a JSON array of them, or one per line (JSON lines,
    blank lines skipped). Raises ``ValueError`` saying where the text is not JSON."""
    if text.lstrip().startswith("["):
        try:
            tasks = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON array: {exc}") from None
        return list(tasks)
    tasks: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                tasks.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number} is not JSON: {exc}") from None
    return tasks


def batches(tasks: Sequence[Any]) -> Iterator[tuple[int, list[Any]]]:
    """``tasks`` in order, in batches of at most ``MAX_BULK_TASKS`` and ``BATCH_BYTES`` (a
    larger task goes alone), each with the index of its first task."""
    batch: list[Any] = []
    first = size = 0
    for index, task in enumerate(tasks):
        task_size = len(json.dumps(task).encode()) + 2  # and the ", " before it
        if batch and (len(batch) == MAX_BULK_TASKS or size + task_size > BATCH_BYTES):
            yield first, batch
            batch, first, size = [], index, 0
        batch.append(task)
        size += task_size
    if batch:
        yield first, batch

"""Reading stored task documents, the same way in every store adapter.

A document that cannot be read (a hand edit in Redis, another version's format) is never
taken for a task, nor for a task that is gone: a read of one task raises
``UnreadableTask``, a read of many leaves it out with a warning naming it, so that one
such document cannot fail a listing or a batch (see ``TaskStore``).
"""

from __future__ import annotations

import logging

import msgspec

from app.domain import Task, UnreadableTask
from app.logs import about

log = logging.getLogger(__name__)

_task_decoder = msgspec.json.Decoder(Task)


def decode_task(task_id: str, document: bytes) -> Task:
    """The task stored as ``document``; ``UnreadableTask`` when it cannot be read."""
    try:
        return _task_decoder.decode(document)
    except msgspec.DecodeError as exc:
        raise UnreadableTask(task_id, document, str(exc)) from None


def readable_task(task_id: str, document: bytes | None) -> Task | None:
    """The task stored as ``document``, or ``None`` when there is none or it cannot be
    read (logged: a read of many tasks goes on without it)."""
    if document is None:
        return None
    try:
        return decode_task(task_id, document)
    except UnreadableTask as unreadable:
        log_unreadable(unreadable)
        return None


def log_unreadable(unreadable: UnreadableTask) -> None:
    """A warning naming the task and what is wrong with its document (no traceback: the
    fault is in the data)."""
    log.warning("%s: %s", unreadable, unreadable.reason, extra=about(unreadable.task_id))

"""Reading stored task and run documents, the same way in every store adapter.

A document that cannot be read (a hand edit in Redis, another version's format) is never
taken for a task or a run, nor for one that is gone: a read of one task raises
``UnreadableTask`` (of one run, ``UnreadableRun``), a read of many leaves it out with a
warning naming it, so that one such document cannot fail a listing or a batch (see
``TaskStore``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgspec

from app.domain import Run, Task, UnreadableRun, UnreadableTask
from app.logs import about
from app.ports import MAX_UNREADABLE_NAMED, RunHistory

log = logging.getLogger(__name__)

_task_decoder = msgspec.json.Decoder(Task)
_run_decoder = msgspec.json.Decoder(Run)


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


def decode_run(task_id: str, run_id: str, document: bytes) -> Run:
    """The run stored as ``document``; ``UnreadableRun`` when it cannot be read."""
    try:
        return _run_decoder.decode(document)
    except msgspec.DecodeError as exc:
        raise UnreadableRun(task_id, run_id, str(exc)) from None


def readable_run(task_id: str, run_id: str, document: bytes | None) -> Run | None:
    """The run stored as ``document``, or ``None`` when there is none or it cannot be
    read (logged: a read of many runs goes on without it)."""
    if document is None:
        return None
    try:
        return decode_run(task_id, run_id, document)
    except UnreadableRun as unreadable:
        log.warning(
            "%s: %s", unreadable, unreadable.reason, extra=about(task_id, unreadable.run_id)
        )
        return None


def run_history(task_id: str, documents: Iterable[tuple[str, bytes | None]]) -> RunHistory:
    """The runs stored as ``documents`` (run id, document), in order, leaving out those
    that are gone and naming those that cannot be read (in one warning for them all)."""
    runs: list[Run] = []
    unreadable: list[UnreadableRun] = []
    for run_id, document in documents:
        if document is None:
            continue  # deleted between the read of the ids and that of the documents
        try:
            runs.append(decode_run(task_id, run_id, document))
        except UnreadableRun as exc:
            unreadable.append(exc)
    if unreadable:
        named = unreadable[:MAX_UNREADABLE_NAMED]
        log.warning(
            "task %r: %d run(s) left out of its history, their stored documents cannot be "
            "read (corrupted, or written by another version of taskq): %s%s",
            task_id,
            len(unreadable),
            "; ".join(f"{exc.run_id!r}: {exc.reason}" for exc in named),
            "" if len(named) == len(unreadable) else "; ...",
            extra=about(task_id),
        )
    return RunHistory(runs, [exc.run_id for exc in unreadable])

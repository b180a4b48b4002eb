"""Upcoming fires: every time a task is due in a window, recurrences expanded, in time
order (ties in task id order), a page at a time.

Nothing loads every task. A page reads ``scheduled_tasks`` in score order, a batch of
entries with their documents per round trip, and merges the fires of the tasks read so
far (``coming_fires``, from each document: the score is not always a fire). A fire is
handed out once no unread entry can come before it: a task's score is a lower bound of
the fires listed for it (its next due time, or its retry's: see ``coming_fires``),
except where it is a running run's lease or a scheduler's claim: those tasks
(``busy_tasks``) are read first. A page reads at most ``MAX_TASKS_PER_PAGE`` of each:
with more tasks due before its position than that, it stops early (a shorter page with
a cursor) or, when it cannot hand out a single fire, raises ``TooManyScheduled``.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec

from app.domain import DomainError, Fire, Task, coming_fires, timestamp
from app.ports import TaskStore
from app.schemas import parse_moment

DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=7)
MAX_TASKS_PER_PAGE = 10_000
"""Entries of ``scheduled_tasks`` one page reads at most (documents decoded, first fires
computed): what bounds a page's cost, whatever the number of tasks."""
READ_BATCH = 1000
"""Entries read per round trip."""
_SCORE_MARGIN = 0.001
_TICK = timedelta(microseconds=1)


class UpcomingFire(msgspec.Struct, kw_only=True):
    """One fire in the window, as the API shows it."""

    task_id: str
    name: str
    due_at: datetime
    recurring: bool
    retry: bool = False
    """A failed run's next attempt, at its ``retry_at``."""


class InvalidWindow(DomainError):
    """A window, limit or cursor the upcoming fires cannot be listed for."""


class TooManyScheduled(DomainError):
    """More tasks may fire before the page's position than one page may read."""


@dataclass(frozen=True, slots=True)
class Window:
    """Fires due at ``start`` or later and before ``end``; with ``after`` (the last fire a
    previous page handed out: its due time and task id) only those after it."""

    start: datetime
    end: datetime
    after: tuple[datetime, str] | None = None

    @classmethod
    def of(cls, start: str | None, end: str | None, now: datetime) -> Window:
        """The window of the query's ``from`` and ``to`` (defaults: now, 24 h later)."""
        try:
            first = now if start is None else parse_moment("from", start)
            last = first + DEFAULT_WINDOW if end is None else parse_moment("to", end)
        except ValueError as exc:
            raise InvalidWindow(str(exc)) from None
        if last <= first:
            raise InvalidWindow("`to` must be later than `from`")
        if last - first > MAX_WINDOW:
            raise InvalidWindow(f"the window is longer than {MAX_WINDOW.days} days: narrow it")
        return cls(first, last)

    def start_for(self, task_id: str) -> datetime:
        """The earliest fire of ``task_id`` this page may list (ties go in id order)."""
        if self.after is None:
            return self.start
        due, last_id = self.after
        return max(self.start, due if task_id > last_id else due + _TICK)


class _Cursor(msgspec.Struct, array_like=True):
    version: int
    start: int
    end: int
    due: int
    task_id: str


_cursor_decoder = msgspec.json.Decoder(_Cursor)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _TICK


def _moment(micros: int) -> datetime:
    return _EPOCH + micros * _TICK


def encode_cursor(window: Window, last: UpcomingFire) -> str:
    """The cursor of the page after ``last``: it carries the window with it."""
    cursor = _Cursor(
        1, _micros(window.start), _micros(window.end), _micros(last.due_at), last.task_id
    )
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def resume_window(cursor: str, start: str | None, end: str | None) -> Window:
    """The window a cursor continues; ``from``/``to`` given with it must be its own."""
    window = _decode(cursor)
    given = Window.of(start, end, window.start)
    if (start is not None and given.start != window.start) or (
        end is not None and given.end != window.end
    ):
        raise InvalidWindow("the cursor belongs to another window: pass the same `from` and `to`")
    return window


def _decode(cursor: str) -> Window:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        fields = _cursor_decoder.decode(raw)
        window = Window(
            _moment(fields.start), _moment(fields.end), (_moment(fields.due), fields.task_id)
        )
    except (binascii.Error, ValueError, OverflowError, msgspec.DecodeError):
        raise InvalidWindow("cursor is not one this server handed out") from None
    if fields.version != 1 or not window.start < window.end <= window.start + MAX_WINDOW:
        raise InvalidWindow("cursor is not one this server handed out")
    return window


class _Merge:
    """The fires of the tasks read so far, merged in (due time, task id) order."""

    def __init__(self, window: Window) -> None:
        self._window = window
        self._heap: list[tuple[datetime, str, bool]] = []
        self._fires: dict[str, tuple[Task, Iterator[Fire]]] = {}

    def add(self, task: Task) -> None:
        if task.id not in self._fires:  # not read already: busy, or its entry moved
            fires = coming_fires(task, self._window.start_for(task.id))
            self._fires[task.id] = (task, fires)
            self._push_next(task.id)

    def _push_next(self, task_id: str) -> None:
        fire = next(self._fires[task_id][1], None)
        if fire is not None and fire.due_at < self._window.end:
            heapq.heappush(self._heap, (fire.due_at, task_id, fire.retry))

    def pop_before(self, bound: float, count: int) -> list[UpcomingFire]:
        """Up to ``count`` fires, earliest first, due before ``bound`` (unix seconds)."""
        popped: list[UpcomingFire] = []
        while self._heap and len(popped) < count and timestamp(self._heap[0][0]) < bound:
            due, task_id, retry = heapq.heappop(self._heap)
            task = self._fires[task_id][0]
            popped.append(
                UpcomingFire(
                    task_id=task_id,
                    name=task.name,
                    due_at=due,
                    recurring=task.schedule is not None,
                    retry=retry,
                )
            )
            self._push_next(task_id)
        return popped


async def upcoming_page(
    store: TaskStore, window: Window, *, limit: int
) -> tuple[list[UpcomingFire], str | None]:
    """Up to ``limit`` fires of ``window`` in time order, and the next page's cursor
    (``None`` after the last fire)."""
    merge = _Merge(window)
    busy = await store.busy_tasks(limit=MAX_TASKS_PER_PAGE + 1)
    if len(busy) > MAX_TASKS_PER_PAGE:
        raise TooManyScheduled(
            f"more than {MAX_TASKS_PER_PAGE} tasks are running or being dispatched, more "
            "than one page reads: the upcoming fires cannot be listed now"
        )
    for task in busy:
        merge.add(task)
    fires: list[UpcomingFire] = []
    until = timestamp(window.end)
    offset = 0
    while True:
        # One more than the most: exactly that many tasks are all read, not too many.
        batch = min(READ_BATCH, MAX_TASKS_PER_PAGE + 1 - offset)
        entries = await store.scheduled_entries(until=until, offset=offset, limit=batch)
        offset += len(entries)
        for entry in entries:
            if entry.task is not None:
                merge.add(entry.task)
        read_all = len(entries) < batch
        # Floats: a fire this close to the score of an entry not read yet waits for it.
        bound = math.inf if read_all else entries[-1].score - _SCORE_MARGIN
        fires += merge.pop_before(bound, limit + 1 - len(fires))
        if len(fires) > limit:
            return fires[:limit], encode_cursor(window, fires[limit - 1])
        if read_all:
            return fires, None
        if offset > MAX_TASKS_PER_PAGE:
            if fires:
                return fires, encode_cursor(window, fires[-1])
            last = datetime.fromtimestamp(entries[-1].score, UTC)
            raise TooManyScheduled(
                f"more than {MAX_TASKS_PER_PAGE} tasks may fire before "
                f"{last:%Y-%m-%dT%H:%M:%SZ}, more than one page reads: the fires after "
                "that cannot be listed"
            )

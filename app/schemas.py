"""Request bodies of the API: what a client may send, validated while decoding.

Server-owned fields (status, timestamps, runs, revision) are not part of any request,
and unknown fields are refused, so a client cannot set them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError
from msgspec import UNSET, UnsetType

from app.domain import (
    DEFAULT_QUEUE,
    MAX_COMMAND_BYTES,
    QUEUE_NAME_PATTERN,
    TASK_ID_PATTERN,
    Chain,
    MisfirePolicy,
    Notify,
    OverlapPolicy,
    Recurrence,
)

TaskIdField = Annotated[
    str, msgspec.Meta(pattern=TASK_ID_PATTERN, description="Letters, digits, '.', '_', '-'")
]
# Text that reaches a process (argv, environment, working directory) or names it: a NUL
# byte would end it early, so it is refused here rather than failing at run time.
NO_NUL = r"^[^\x00]*$"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
Description = Annotated[str, msgspec.Meta(max_length=4096)]
Command = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_COMMAND_BYTES,
        pattern=NO_NUL,
        description=f"Run with `sh -c`; at most {MAX_COMMAND_BYTES} bytes in UTF-8",
    ),
]
Argument = Annotated[str, msgspec.Meta(max_length=MAX_COMMAND_BYTES, pattern=NO_NUL)]
Args = Annotated[
    list[Argument],
    msgspec.Meta(
        min_length=1,
        max_length=1024,
        description=f"An argv run without a shell; at most {MAX_COMMAND_BYTES} bytes in all",
    ),
]
# `$` alone also matches before a final newline in Python; `(?!\n)` rules that out, and an
# ECMA regex (the OpenAPI document's dialect) reads the pattern the same way.
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$(?!\n)"
MAX_ENV_ENTRIES = 128
MAX_ENV_BYTES = 32 * 1024
EnvName = Annotated[str, msgspec.Meta(pattern=ENV_NAME_PATTERN)]
EnvValue = Annotated[str, msgspec.Meta(max_length=MAX_COMMAND_BYTES, pattern=NO_NUL)]
Env = Annotated[
    dict[EnvName, EnvValue],
    msgspec.Meta(
        max_length=MAX_ENV_ENTRIES,
        description=f"At most {MAX_ENV_BYTES} bytes of names and values in all",
    ),
]
QueueName = Annotated[
    str,
    msgspec.Meta(
        pattern=QUEUE_NAME_PATTERN,
        description="The queue (worker pool) its runs go to: 1-64 letters, digits, '_', '.',"
        " '-'; only consumers serving it run them",
    ),
]
Cwd = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=NO_NUL)]
Timeout = Annotated[
    float,
    msgspec.Meta(
        gt=0,
        le=7 * 86400,
        description="Seconds before the command is killed",
    ),
]
MaxAttempts = Annotated[
    int, msgspec.Meta(ge=1, le=100, description="Runs before a failing task is `failed`")
]
RetryBackoff = Annotated[
    float,
    msgspec.Meta(
        ge=0,
        le=86400,
        description="Least seconds before the 2nd attempt; doubles each time; jitter adds "
        "up to half again",
    ),
]
SuccessExitCodes = Annotated[
    list[Annotated[int, msgspec.Meta(ge=0, le=255)]],
    msgspec.Meta(min_length=1, max_length=256, description="Exit codes that count as success"),
]
Misfire = Annotated[
    MisfirePolicy,
    msgspec.Meta(
        description="Fires of a recurrence missed by more than `misfire_grace` (downtime): "
        "`coalesce` runs once for all of them, `skip` records a skipped run instead"
    ),
]
MisfireGrace = Annotated[
    float,
    msgspec.Meta(ge=0, le=366 * 86400, description="Seconds a fire may be late and still run"),
]
Overlap = Annotated[
    OverlapPolicy,
    msgspec.Meta(
        description="A fire due while the previous run has not ended: `queue` runs it right "
        "after that run, `forbid` skips it and records a skipped run"
    ),
]
# The calendar ends with 9999: a time is refused unless its year, as written, leaves a day
# on either side for its UTC offset and room after it for the fire times computed from it.
# The pattern says the same in the OpenAPI document.
FIRST_YEAR, LAST_YEAR = 2, 8999
YEAR_PATTERN = r"^(?:000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3})-"
Moment = Annotated[
    datetime,
    msgspec.Meta(
        tz=True,
        description=f"RFC 3339 with a UTC offset, in the years {FIRST_YEAR:04d} to {LAST_YEAR}",
        extra_json_schema={"pattern": YEAR_PATTERN},
    ),
]


def _check_moment(field: str, moment: datetime | None) -> None:
    if moment is not None and not FIRST_YEAR <= moment.year <= LAST_YEAR:
        raise ValueError(f"`{field}` must be in the years {FIRST_YEAR:04d} to {LAST_YEAR}")


_moment_decoder = msgspec.json.Decoder(Moment)


def parse_moment(field: str, text: str) -> datetime:
    """A time written as text (a query parameter) read by the rules of a body's times;
    raises ``ValueError`` naming ``field`` when it is not one."""
    try:
        moment = _moment_decoder.decode(msgspec.json.encode(text))
    except msgspec.ValidationError:
        raise ValueError(
            f"`{field}` must be an RFC 3339 time with a UTC offset, got {text!r}"
        ) from None
    _check_moment(field, moment)
    return moment.astimezone(UTC)


def _check_env(env: dict[str, str]) -> None:
    size = sum(len(name.encode()) + len(value.encode()) for name, value in env.items())
    if size > MAX_ENV_BYTES:
        raise ValueError(f"`env` is {size} bytes in all, more than {MAX_ENV_BYTES}")


def _check_program(command: str | None, args: list[str] | None, *, required: bool) -> None:
    if command is not None and args is not None:
        raise ValueError("give either `command` or `args`, not both")
    if required and command is None and args is None:
        raise ValueError("one of `command` or `args` is required")
    if command is not None and len(command.encode()) > MAX_COMMAND_BYTES:
        raise ValueError(f"`command` is longer than {MAX_COMMAND_BYTES} bytes")
    if args is not None and sum(len(a.encode()) for a in args) > MAX_COMMAND_BYTES:
        raise ValueError(f"`args` are longer than {MAX_COMMAND_BYTES} bytes in all")


UPCOMING_ROUTE_ID = "scheduled"
"""A new task may not take this id: ``GET /tasks/scheduled`` (the upcoming fires) would
hide it. A task stored with it before it was reserved can still be changed and deleted."""


class TaskCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A new task: a shell ``command`` or an ``args`` vector, exactly one of the two."""

    id: TaskIdField | None = None
    name: Name
    description: Description = ""
    command: Command | None = None
    args: Args | None = None
    env: Env = {}
    cwd: Cwd | None = None
    timeout: Timeout | None = None
    max_attempts: MaxAttempts = 1
    retry_backoff: RetryBackoff = 10.0
    success_exit_codes: SuccessExitCodes = msgspec.field(default_factory=lambda: [0])
    misfire: Misfire = MisfirePolicy.COALESCE
    misfire_grace: MisfireGrace = 60.0
    overlap: Overlap = OverlapPolicy.QUEUE
    queue: QueueName = DEFAULT_QUEUE
    scheduled_at: Moment | None = None
    notify: Notify | None = None
    chain: Chain | None = None

    def __post_init__(self) -> None:
        if self.id == UPCOMING_ROUTE_ID:
            raise ValueError(
                f"task id {self.id!r} is reserved: GET /tasks/{self.id} lists the upcoming fires"
            )
        _check_program(self.command, self.args, required=True)
        _check_env(self.env)
        _check_moment("scheduled_at", self.scheduled_at)


MAX_BULK_TASKS = 1000


class BulkCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """New tasks, each one as ``POST /tasks`` takes it (``TaskCreate``), at most
    ``MAX_BULK_TASKS``. Only the list is checked here: each task is validated on its own,
    so that an invalid one is answered in its place instead of refusing the others."""

    tasks: Annotated[list[Any], msgspec.Meta(min_length=1)]


class TaskUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields to change; omitted fields stay as they are, ``null`` clears a nullable one.

    Giving ``command`` replaces ``args`` and the other way round.
    """

    name: Name | UnsetType = UNSET
    description: Description | UnsetType = UNSET
    command: Command | UnsetType = UNSET
    args: Args | UnsetType = UNSET
    env: Env | UnsetType = UNSET
    cwd: Cwd | UnsetType | None = UNSET
    timeout: Timeout | UnsetType | None = UNSET
    max_attempts: MaxAttempts | UnsetType = UNSET
    retry_backoff: RetryBackoff | UnsetType = UNSET
    success_exit_codes: SuccessExitCodes | UnsetType = UNSET
    misfire: Misfire | UnsetType = UNSET
    misfire_grace: MisfireGrace | UnsetType = UNSET
    overlap: Overlap | UnsetType = UNSET
    queue: QueueName | UnsetType = UNSET
    notify: Notify | UnsetType | None = UNSET
    chain: Chain | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        _check_program(
            None if self.command is UNSET else self.command,
            None if self.args is UNSET else self.args,
            required=False,
        )
        if self.env is not UNSET:
            _check_env(self.env)

    def changes(self) -> dict[str, object]:
        """The fields to set on the task."""
        given = {
            field: value
            for field in self.__struct_fields__
            if (value := getattr(self, field)) is not UNSET
        }
        if "command" in given:
            given["args"] = None
        elif "args" in given:
            given["command"] = None
        return given


CronExpression = Annotated[
    str,
    msgspec.Meta(
        min_length=9,
        max_length=200,
        description="5 fields, or 6 with a leading seconds field: `*/5 * * * *`",
    ),
]
TimezoneName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, description="IANA name: `Europe/Berlin`")
]
Interval = Annotated[float, msgspec.Meta(ge=1, le=366 * 86400, description="Seconds between runs")]


class ScheduleRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """When to run the task: once ``at`` a time, or on a ``cron`` expression (in
    ``timezone``, default UTC) or ``every`` N seconds, optionally between ``start`` and
    ``end``. Exactly one of ``at``, ``cron`` and ``every``."""

    at: Moment | None = None
    cron: CronExpression | None = None
    timezone: TimezoneName | None = None
    every: Interval | None = None
    start: Moment | None = None
    end: Moment | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("at", "cron", "every") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `at`, `cron` and `every`")
        if self.timezone is not None:
            if self.cron is None:
                raise ValueError("`timezone` goes with `cron`")
            try:
                ZoneInfo(self.timezone)
            # A directory of zones ("Europe") fails with an OSError.
            except (ZoneInfoNotFoundError, ValueError, OSError):
                raise ValueError(f"`timezone`: unknown time zone {self.timezone!r}") from None
        for field in ("at", "start", "end"):
            _check_moment(field, getattr(self, field))
        if self.at is not None and (self.start is not None or self.end is not None):
            raise ValueError("`start` and `end` go with `cron` or `every`, not `at`")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise ValueError("`start` must be before `end`")
        if self.cron is not None:
            try:
                CronSim(self.cron, datetime.now(UTC))
            except CronSimError as exc:
                raise ValueError(f"`cron`: {exc}") from None

    def recurrence(self, now: datetime) -> Recurrence | None:
        """The repeating schedule asked for (``None`` for a one-shot ``at``)."""
        if self.cron is not None:
            return Recurrence(
                cron=self.cron,
                timezone=self.timezone or "UTC",
                start=_utc(self.start),
                end=_utc(self.end),
            )
        if self.every is not None:
            # Anchored, so that the phase of the interval never drifts.
            return Recurrence(every=self.every, start=_utc(self.start) or now, end=_utc(self.end))
        return None


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)

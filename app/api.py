"""The HTTP API: translates requests into ``TaskService`` calls and domain errors into 4xx.

No store or broker code lives here; controllers get the service through ``Provide``.

With API tokens configured, every route needs ``Authorization: Bearer <token>`` except
``GET``/``HEAD /health`` (orchestrators and load balancers probe it without credentials),
``GET /metrics`` (Prometheus scrapes it without credentials),
the OpenAPI UI and document under ``/schema`` with the ``/swagger/index.html``
redirect (they describe the API, not its data), and the dashboard's static files under
``/ui`` with the ``/`` redirect (its pages ask for a token when the API answers them 401).
Those routes opt out through ``opt={EXCLUDE_FROM_AUTH: True}``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing, suppress
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast
from urllib.parse import quote

import anyio
import msgspec
from litestar import (
    Controller,
    Litestar,
    MediaType,
    Request,
    Response,
    Router,
    delete,
    get,
    head,
    post,
    put,
)
from litestar.connection import ASGIConnection
from litestar.datastructures import ResponseHeader
from litestar.di import NamedDependency, Provide
from litestar.enums import ScopeType
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    ValidationException,
)
from litestar.middleware import (
    AbstractAuthenticationMiddleware,
    ASGIMiddleware,
    AuthenticationResult,
    DefineMiddleware,
)
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme
from litestar.params import (
    FromPath,
    FromQuery,
    HeaderParameter,
    JSONBody,
    Parameter,
    QueryParameter,
)
from litestar.response import Redirect, ServerSentEvent, ServerSentEventMessage
from litestar.static_files import create_static_files_router  # pyright: ignore[reportUnknownVariableType]
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_202_ACCEPTED,
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from msgspec import UNSET, UnsetType

from app.body_deadline import DEFAULT_BODY_SECONDS, BodyDeadline
from app.chains import ChainRefused
from app.domain import (
    QUEUE_NAME_PATTERN,
    TASK_ID_PATTERN,
    DomainError,
    InvalidSchedule,
    InvalidTransition,
    Run,
    RunNotFound,
    Task,
    TaskAlreadyExists,
    TaskNotFound,
    TaskStatus,
    TaskView,
    UnreadableRun,
    UnreadableTask,
)
from app.events import EVENT_ID_PATTERN, InvalidEventId, keep_task
from app.live_output import KEEPALIVE_SECONDS, KeepAlive, OutputEnd, OutputEvent, OutputText
from app.logs import about
from app.metrics_http import RequestMetrics, metrics_handler
from app.notifications import NotificationRecord
from app.openapi_contract import describe_contract
from app.outages import DependencyDown, OutageGate, probe
from app.ports import (
    MAX_UNREADABLE_NAMED,
    BrokerUnavailable,
    EventBatch,
    QueueStats,
    StoreUnavailable,
    TooManyFollowers,
)
from app.schedule_words import describe_schedule
from app.schemas import (
    MAX_BULK_TASKS,
    UPCOMING_ROUTE_ID,
    BulkCreate,
    ScheduleRequest,
    TaskCreate,
    TaskUpdate,
)
from app.service import QUEUE_SCAN_READS, InvalidCursor, TaskService, encode_cursor
from app.transactions import StoreContention
from app.upcoming import (
    MAX_TASKS_PER_PAGE,
    MAX_WINDOW,
    READ_BATCH,
    InvalidWindow,
    TooManyScheduled,
    UpcomingFire,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_048_576
MAX_PAGE = 1000
# Orchestrators probe /health with a timeout of about a second: each check gets less.
HEALTH_CHECK_SECONDS = 0.5
# While the store is known down, how often a request may probe whether it is back.
STORE_PROBE_SECONDS = 1.0
# What a 503 asks a client to wait when nothing better is known.
RETRY_AFTER_SECONDS = 1
# A list answer stops at the first item that takes it past this many bytes of JSON (it
# always holds one item): a page of large tasks, or of runs with their output, stays small.
PAGE_BUDGET_BYTES = 1_048_576
SCHEMA_PATH = "/schema"
UI_PATH = "/ui"
UI_DIRECTORY = Path(__file__).with_name("ui")
# Route ``opt`` key of the routes that answer without a token.
EXCLUDE_FROM_AUTH = "exclude_from_auth"
BEARER_SCHEME = "bearerToken"
# One message for a missing, malformed or wrong token: the answer tells nothing about tokens.
NOT_AUTHORIZED = "Not authorized"


class ConflictException(HTTPException):
    """The task's id or current state conflicts with the request (409)."""

    status_code = HTTP_409_CONFLICT


class ChainRefusedException(HTTPException):
    """A chain names a task that does not exist, loops or reaches too far (422)."""

    status_code = HTTP_422_UNPROCESSABLE_ENTITY


class UnreadableTaskException(HTTPException):
    """The task is stored, but its document cannot be read (500): the fault is in the
    store, not in the request. Only deleting the task works on it."""

    status_code = HTTP_500_INTERNAL_SERVER_ERROR
    detail = (
        "The task is stored, but its document cannot be read (corrupted, or written by "
        "another version of taskq); it can only be deleted"
    )


class UnreadableRunException(HTTPException):
    """The run is stored, but its document cannot be read (500): the fault is in the
    store, not in the request."""

    status_code = HTTP_500_INTERNAL_SERVER_ERROR
    detail = (
        "The run is stored, but its document cannot be read (corrupted, or written by "
        "another version of taskq)"
    )


class TooManyTasks(HTTPException):
    """A bulk create with more tasks than one request may carry (413)."""

    status_code = HTTP_413_REQUEST_ENTITY_TOO_LARGE


class ServiceUnavailableException(HTTPException):
    status_code = HTTP_503_SERVICE_UNAVAILABLE


class DependencyCheck(msgspec.Struct):
    status: str
    detail: str | None = None


class QueueHealth(msgspec.Struct):
    """A taskq queue (worker pool): messages waiting in it and consumers serving it. A
    queue with messages and no consumer holds runs that nothing will start yet."""

    depth: int
    consumers: int


class Health(msgspec.Struct, omit_defaults=True):
    """``ok`` when every dependency answered, ``unavailable`` otherwise; ``queues``: each
    queue in use, when the broker answered."""

    status: str
    checks: dict[str, DependencyCheck]
    queues: dict[str, QueueHealth] | None = None


class TaskResponse(TaskView, kw_only=True):
    """A task as the API answers with it: what is stored but the workers' own bookkeeping,
    and its recurrence in words (computed for the answer, never stored)."""

    schedule_description: str | None = None


def _shown(task: Task) -> TaskResponse:
    """The task as the API answers with it."""
    shown = msgspec.convert(task, TaskResponse, from_attributes=True)
    shown.schedule_description = describe_schedule(task.schedule)
    return shown


class RunShown(Run, kw_only=True):
    """A run as the API shows it: with how its notifications went (``notify``)."""

    notifications: list[NotificationRecord] = msgspec.field(
        default_factory=list[NotificationRecord]
    )


class RunListed(RunShown, kw_only=True):
    """A run in a list: its ``output`` only when asked for (``GET /tasks/{id}/runs/{run_id}``
    always has it)."""

    output: str | UnsetType = UNSET  # pyright: ignore[reportIncompatibleVariableOverride]


class CreateResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One task's answer in a bulk create, in the order sent: what ``POST /tasks`` would
    have answered for it alone. ``status`` 201 with the ``task`` created, or 400 (invalid),
    409 (its id is taken) or 422 (its chain is refused) with the problem's ``detail``."""

    status: int
    task: TaskResponse | None = None
    detail: str | None = None


T = TypeVar("T")
Check = Callable[[], Awaitable[str | None]]
"""A dependency's health check: raises if it is down; may say something of it while up."""
QueueCheck = Callable[[], Awaitable[Sequence[QueueStats]]]
# Injected by name from ``create_app``'s dependencies (inferring it is deprecated in Litestar).
Service = NamedDependency[TaskService]


class BearerTokenAuth(AbstractAuthenticationMiddleware):
    """Lets a request through only with ``Authorization: Bearer <one of tokens>``."""

    def __init__(self, app: Any, *, tokens: Sequence[str], **options: Any) -> None:
        super().__init__(app, **options)
        # Digests have one length whatever the token's, so comparing them reveals no length.
        self._digests = [_digest(token.encode()) for token in tokens]

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
        token = credentials.strip()
        # Header values arrive decoded as latin-1: encoding back gives the bytes sent.
        presented = _digest(token.encode("latin-1"))
        # Every token is compared, in constant time, so the timing tells nothing about which
        # one (if any) matched.
        matches = [hmac.compare_digest(presented, digest) for digest in self._digests]
        if scheme.lower() != "bearer" or not token or not any(matches):
            raise NotAuthorizedException(
                detail=NOT_AUTHORIZED, headers={"WWW-Authenticate": "Bearer"}
            )
        return AuthenticationResult(user=None, auth=token)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class AllowEveryMethod(ASGIMiddleware):
    """Answers ``OPTIONS`` with every method of the path in ``Allow``.

    Litestar 2 makes a path's OPTIONS handler with the methods known when it made it, so
    it names only some of them (litestar#4169, fixed in Litestar 3).
    """

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] != "OPTIONS":
            await next_app(scope, receive, send)
            return
        by_path = scope["litestar_app"].route_handler_method_map
        methods = {m for path in scope["route_handler"].paths for m in by_path.get(path, {})}
        allow = ", ".join(sorted(methods)).encode()

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", allow)]}
            await send(message)

        await next_app(scope, receive, send_with_allow)


class StrictJSONRequest(Request[Any, Any, Any]):
    """Decodes a JSON body into the type of the handler's ``data`` strictly.

    Litestar converts decoded JSON leniently, so ``"5"`` would pass for a number and
    ``1893456000`` for an RFC 3339 time; a strict conversion refuses both. It follows JSON
    Schema (the OpenAPI document's) in one point: ``2.0`` is the integer 2. A body that
    cannot be read (not UTF-8, not JSON, nested too deeply) is a 400 too.
    """

    async def json(self) -> Any:
        data = self.route_handler.parsed_data_field
        if data is None:
            return await super().json()
        body = await self.body()
        if not body.strip():  # an empty one does not get here: see ``_validation_error``
            raise ClientException("Invalid request: a JSON body is required")
        try:
            # Straight into the type: one pass, and what nearly every valid body takes.
            return _typed_decoder(data.annotation).decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            # Not JSON, invalid, or valid only as JSON Schema reads numbers (``2.0`` for
            # an integer): the general path below decides, and says why.
            pass
        try:
            value = _JSON.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ClientException(f"Invalid request: the body is not JSON ({exc})") from None
        except RecursionError:
            raise ClientException("Invalid request: the body is nested too deeply") from None
        return _converted(value, data.annotation)


def _integral_as_int(text: str) -> float | int:
    number = float(text)
    return int(number) if number.is_integer() else number


_JSON = msgspec.json.Decoder(float_hook=_integral_as_int)


@functools.cache
def _typed_decoder(annotation: Any) -> msgspec.json.Decoder[Any]:
    """A strict decoder straight into ``annotation``, made once per request body type
    (``float_hook``: what it decodes as ``Any``, a bulk create's tasks, reads ``2.0`` as
    the general path does)."""
    return msgspec.json.Decoder(annotation, strict=True, float_hook=_integral_as_int)


def _converted(value: Any, annotation: Any) -> Any:
    """``value`` (decoded JSON) as ``annotation``, strictly; a ``ValidationException``
    naming the field at fault when it is not one."""
    try:
        return msgspec.convert(value, annotation, strict=True)
    except msgspec.ValidationError as exc:
        raise _invalid_body(str(exc)) from None


def _invalid_body(message: str) -> ValidationException:
    """A ``ValidationException`` shaped like Litestar's own, naming the field at fault."""
    message, _, path = message.partition(" - at `")
    if path.startswith("key` in `"):  # a key of an object, such as an `env` name
        message, path = f"{message} (a key)", path.removeprefix("key` in `")
    field = path.removesuffix("`").removeprefix("$").removeprefix(".")
    error: dict[str, str] = {"message": message, "source": "body"}
    if field:
        error["key"] = field
    return ValidationException(detail=message, extra=[error])


NEXT_CURSOR_HEADER = ResponseHeader(
    name="X-Next-Cursor",
    description="Pass as `cursor` to get the next page",
    documentation_only=True,
    required=False,
)
UNREADABLE_HEADER = ResponseHeader(
    name="X-Unreadable-Tasks",
    description="The ids, comma-separated (each percent-encoded, which leaves a valid id "
    "as it is), of the tasks on this stretch of the index whose stored document cannot "
    "be read: left out of the page (`GET /tasks/{task_id}` answers 500 for them, "
    f"`DELETE` removes them). At most {MAX_UNREADABLE_NAMED}: a page with more ends at the "
    f"{MAX_UNREADABLE_NAMED}th, the next one starts after it. Absent when there are none",
    documentation_only=True,
    required=False,
)
UNREADABLE_RUNS_HEADER = ResponseHeader(
    name="X-Unreadable-Runs",
    description="The ids, comma-separated (each percent-encoded), of the runs among the "
    "`limit` newest whose stored document cannot be read: left out of the list "
    f"(`GET /tasks/{{task_id}}/runs/{{run_id}}` answers 500 for them). At most "
    f"{MAX_UNREADABLE_NAMED} are named, the newest first. Absent when there are none",
    documentation_only=True,
    required=False,
)
PageLimit = Annotated[int, Parameter(ge=1, le=MAX_PAGE)]
PageCursor = Annotated[str | None, Parameter(max_length=1024)]
QueueFilter = Annotated[str | None, Parameter(pattern=QUEUE_NAME_PATTERN)]


class TaskController(Controller):
    path = "/tasks"
    tags = ["tasks"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @post(
        "/",
        summary="Create a task",
        raises=[
            ValidationException,
            ConflictException,
            ChainRefusedException,
            NotAuthorizedException,
        ],
    )
    async def create_task(self, data: JSONBody[TaskCreate], service: Service) -> TaskResponse:
        return _shown(await service.create(data))

    @get(
        "/",
        summary="List tasks",
        description="Pages in id order. The next page's cursor is in `X-Next-Cursor`, "
        "absent on the last page. A page covers `limit` entries of the index: tasks whose "
        "stored document cannot be read are left out of it and named in "
        "`X-Unreadable-Tasks`, so it may come back short with a cursor to follow. With "
        f"`queue`, only that queue's tasks: a page then reads at most {QUEUE_SCAN_READS} x "
        "`limit` tasks of the index, so it may come back short, even empty, with a cursor "
        "to follow.",
        response_headers=[NEXT_CURSOR_HEADER, UNREADABLE_HEADER],
        raises=[ValidationException, NotAuthorizedException],
    )
    async def list_tasks(
        self,
        service: Service,
        status: FromQuery[TaskStatus | None] = None,
        limit: PageLimit = 100,
        cursor: PageCursor = None,
        queue: QueueFilter = None,
    ) -> Response[list[TaskResponse]]:
        listing = await service.list(status=status, limit=limit, cursor=cursor, queue=queue)
        tasks, next_cursor, unreadable = listing.tasks, listing.next_cursor, listing.unreadable
        if len(unreadable) > MAX_UNREADABLE_NAMED:
            # The header stays short (clients refuse long ones): the page ends at the last
            # unreadable task it names, and the next one starts after it.
            last = unreadable[MAX_UNREADABLE_NAMED - 1]
            tasks = [task for task in tasks if task.id < last]
            unreadable = unreadable[:MAX_UNREADABLE_NAMED]
            next_cursor = encode_cursor(last)
        page = _within_budget([_shown(task) for task in tasks])
        if len(page) < len(tasks):
            next_cursor = encode_cursor(page[-1].id)
            # The next page starts after the last task shown, and names those after it.
            unreadable = [task_id for task_id in unreadable if task_id < page[-1].id]
        response = _page(page, next_cursor)
        _name_unreadable(response, "X-Unreadable-Tasks", unreadable)
        return response

    @get(
        f"/{UPCOMING_ROUTE_ID}",
        summary="List upcoming fires",
        description="Every fire due from `from` (default: now) to before `to` (default: 24 h "
        f"after `from`; at most {MAX_WINDOW.days} days after it), recurrences expanded, in "
        "time order (ties in task id order): scheduled times of tasks not paused, and "
        "failed runs' retries (`retry`). The next page's cursor is in `X-Next-Cursor`, "
        "absent on the last page; it carries the window. Cost: a page reads the running "
        "tasks, then `scheduled_tasks` in score order, "
        f"{READ_BATCH} entries with their documents per "
        f"round trip, at most {MAX_TASKS_PER_PAGE}: a page can stop short of `limit` (follow "
        f"the cursor), and with more than {MAX_TASKS_PER_PAGE} tasks due before its "
        "position it cannot list the fires after that (400). A task whose id is "
        "`scheduled` (no longer allowed) is hidden from `GET` by this route.",
        response_headers=[NEXT_CURSOR_HEADER],
        raises=[ValidationException, NotAuthorizedException],
    )
    async def list_upcoming(
        self,
        service: Service,
        start: Annotated[
            str | None, QueryParameter(name="from", max_length=64, description="RFC 3339")
        ] = None,
        end: Annotated[
            str | None, QueryParameter(name="to", max_length=64, description="RFC 3339")
        ] = None,
        limit: PageLimit = 100,
        cursor: PageCursor = None,
    ) -> Response[list[UpcomingFire]]:
        fires, next_cursor = await service.upcoming(
            start=start, end=end, limit=limit, cursor=cursor
        )
        return _page(fires, next_cursor)

    @get(
        "/{task_id:str}",
        summary="Get a task",
        raises=[NotFoundException, UnreadableTaskException, NotAuthorizedException],
    )
    async def get_task(self, task_id: FromPath[str], service: Service) -> TaskResponse:
        return _shown(await service.get(task_id))

    @put(
        "/{task_id:str}",
        summary="Update a task",
        description="Omitted fields stay as they are.",
        raises=[
            ValidationException,
            NotFoundException,
            UnreadableTaskException,
            ChainRefusedException,
            NotAuthorizedException,
        ],
    )
    async def update_task(
        self, task_id: FromPath[str], data: JSONBody[TaskUpdate], service: Service
    ) -> TaskResponse:
        return _shown(await service.update(task_id, data))

    @delete(
        "/{task_id:str}",
        summary="Delete a task and its runs",
        raises=[NotFoundException, NotAuthorizedException],
    )
    async def delete_task(self, task_id: FromPath[str], service: Service) -> None:
        await service.delete(task_id)

    # ``/tasks/scheduled`` is a static route (the upcoming fires): without these, a task
    # stored with the id ``scheduled`` before it was reserved would get 405 for them.
    @put(
        f"/{UPCOMING_ROUTE_ID}",
        summary="Update the task whose id is `scheduled`",
        description="`PUT /tasks/{task_id}` for a task stored with the id `scheduled` "
        "before that id was reserved (`GET` of this path lists the upcoming fires).",
        deprecated=True,
        raises=[
            ValidationException,
            NotFoundException,
            UnreadableTaskException,
            ChainRefusedException,
            NotAuthorizedException,
        ],
    )
    async def update_task_named_scheduled(
        self, data: JSONBody[TaskUpdate], service: Service
    ) -> TaskResponse:
        return _shown(await service.update(UPCOMING_ROUTE_ID, data))

    @delete(
        f"/{UPCOMING_ROUTE_ID}",
        summary="Delete the task whose id is `scheduled`",
        description="`DELETE /tasks/{task_id}` for a task stored with the id `scheduled` "
        "before that id was reserved.",
        deprecated=True,
        raises=[NotFoundException, NotAuthorizedException],
    )
    async def delete_task_named_scheduled(self, service: Service) -> None:
        await service.delete(UPCOMING_ROUTE_ID)

    @post(
        "/{task_id:str}/execute",
        summary="Run a task now",
        status_code=HTTP_202_ACCEPTED,
        raises=[
            NotFoundException,
            UnreadableTaskException,
            ConflictException,
            NotAuthorizedException,
        ],
    )
    async def execute_task(self, task_id: FromPath[str], service: Service) -> RunShown:
        queued = await service.execute(task_id)  # queueing a run notifies nothing
        return RunShown(**msgspec.structs.asdict(queued))

    @post(
        "/{task_id:str}/schedule",
        summary="Schedule a task",
        description="Once (`at`), or on a recurrence (`cron` with `timezone`, or `every`). "
        "The task's `next_runs` shows the next fire times.",
        status_code=HTTP_200_OK,
        raises=[
            ValidationException,
            NotFoundException,
            UnreadableTaskException,
            NotAuthorizedException,
        ],
    )
    async def schedule_task(
        self, task_id: FromPath[str], data: JSONBody[ScheduleRequest], service: Service
    ) -> TaskResponse:
        return _shown(await service.schedule(task_id, data))

    @delete(
        "/{task_id:str}/schedule",
        summary="Unschedule a task",
        description="No more scheduled runs; a run already queued or running goes on.",
        status_code=HTTP_200_OK,
        raises=[NotFoundException, UnreadableTaskException, NotAuthorizedException],
    )
    async def unschedule_task(self, task_id: FromPath[str], service: Service) -> TaskResponse:
        return _shown(await service.unschedule(task_id))

    @post(
        "/{task_id:str}/cancel",
        summary="Cancel a task's active run",
        description="A queued run never starts; a running command is stopped wherever it "
        "runs (SIGTERM to its process group, SIGKILL after a grace period) and the run and "
        "the task end `cancelled`. A one-shot time the task waits for passes with nothing "
        "run. A recurrence goes on with its next fire time.",
        status_code=HTTP_202_ACCEPTED,
        raises=[
            NotFoundException,
            UnreadableTaskException,
            ConflictException,
            NotAuthorizedException,
        ],
    )
    async def cancel_task(self, task_id: FromPath[str], service: Service) -> TaskResponse:
        return _shown(await service.cancel(task_id))

    @post(
        "/{task_id:str}/pause",
        summary="Pause a task's schedule",
        description="No scheduled fires until resumed; running it by hand still works.",
        status_code=HTTP_200_OK,
        raises=[
            NotFoundException,
            UnreadableTaskException,
            ConflictException,
            NotAuthorizedException,
        ],
    )
    async def pause_task(self, task_id: FromPath[str], service: Service) -> TaskResponse:
        return _shown(await service.pause(task_id))

    @post(
        "/{task_id:str}/resume",
        summary="Resume a paused schedule",
        description="A recurrence goes on from now: fires missed while paused are skipped.",
        status_code=HTTP_200_OK,
        raises=[
            NotFoundException,
            UnreadableTaskException,
            ConflictException,
            NotAuthorizedException,
        ],
    )
    async def resume_task(self, task_id: FromPath[str], service: Service) -> TaskResponse:
        return _shown(await service.resume(task_id))

    @get(
        "/{task_id:str}/runs",
        summary="List a task's runs, newest first",
        description="Without their `output` unless `output=true`; the list then stops "
        f"early once it passes {PAGE_BUDGET_BYTES} bytes (one run's output is at "
        "`/tasks/{task_id}/runs/{run_id}`). Runs whose stored document cannot be read are "
        "left out of the list and named in `X-Unreadable-Runs`, so it may hold fewer than "
        "`limit` runs.",
        response_headers=[UNREADABLE_RUNS_HEADER],
        raises=[ValidationException, NotFoundException, NotAuthorizedException],
    )
    async def list_runs(
        self,
        task_id: FromPath[str],
        service: Service,
        limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 20,
        output: Annotated[
            bool, Parameter(description="Include each run's output", required=False)
        ] = False,
    ) -> Response[list[RunListed]]:
        history = await service.runs(task_id, limit=limit)
        runs = list(history.runs)
        if output:
            runs = _within_budget(runs)
        records = await service.notifications([run.run_id for run in runs])
        response = Response(
            [_listed(run, records.get(run.run_id, []), output=output) for run in runs]
        )
        _name_unreadable(response, "X-Unreadable-Runs", history.unreadable[:MAX_UNREADABLE_NAMED])
        return response

    @get(
        "/{task_id:str}/runs/{run_id:str}",
        summary="Get one run with its output",
        raises=[NotFoundException, UnreadableRunException, NotAuthorizedException],
    )
    async def get_run(
        self, task_id: FromPath[str], run_id: FromPath[str], service: Service
    ) -> RunShown:
        run = await service.run(task_id, run_id)
        records = await service.notifications([run_id])
        return RunShown(**msgspec.structs.asdict(run), notifications=records.get(run_id, []))

    @get(
        "/{task_id:str}/runs/{run_id:str}/output",
        summary="A run's output as Server-Sent Events, live while it runs",
        description='`output` events carry `{"text": ...}` in the order printed; an `end` '
        "event carries the run as recorded (without its output, already sent; `null` if it "
        "was deleted) and closes the stream. Without `follow`, the stream closes after what "
        "there is now (the newest output kept) unless the run already ended. A comment line "
        f"comes every {KEEPALIVE_SECONDS:g} s (`TASKQ_KEEPALIVE_SECONDS`) while the run is "
        "quiet. 503 with `Retry-After` when the server streams `TASKQ_MAX_FOLLOWERS` already.",
        raises=[NotFoundException, UnreadableRunException, NotAuthorizedException],
        media_type="text/event-stream",
    )
    async def run_output(
        self,
        task_id: FromPath[str],
        run_id: FromPath[str],
        service: Service,
        follow: Annotated[
            bool, Parameter(description="Stream until the run ends", required=False)
        ] = False,
    ) -> ServerSentEvent:
        events = await service.output(task_id, run_id, follow=follow)
        return ServerSentEvent(_server_sent(events))


class EventController(Controller):
    """The lifecycle events of every task, live (``app.events``)."""

    path = "/events"
    tags = ["events"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get(
        "/",
        summary="Task and run lifecycle events as Server-Sent Events, live",
        description="Each event as `id: <event id>`, `event: <type>` (`task.created`, "
        "`task.updated`, `task.deleted`, `run.queued`, `run.started`, `run.finished`) and "
        '`data:` its JSON: `{"id", "type", "at", "task_id", "task_status", "run_id", '
        '"attempt", "run_status", "outcome", "exit_code", "duration"}`, fields that do not '
        "apply left out (`task_status` is not on `task.deleted`; the run fields are on "
        "`run.*` only, `outcome`, `exit_code` and `duration` on `run.finished` only). "
        "Events come in the order they happened. The stream resumes after the event id "
        "in the `Last-Event-ID` header (what a browser's `EventSource` sends when it "
        "reconnects) or else in `after`; without either, it starts with the events from "
        "now on. If events after the resume point are no longer kept (the server keeps "
        "the newest `TASKQ_EVENT_HISTORY`), it first sends `event: reset` with "
        '`data: {"oldest": "<id>"}` and goes on from the oldest kept: reload what you '
        f"know. A comment line comes every {KEEPALIVE_SECONDS:g} s "
        "(`TASKQ_KEEPALIVE_SECONDS`) while nothing happens. 400 for a resume point that "
        "is not an event id; 503 with `Retry-After` when the server streams "
        "`TASKQ_MAX_FOLLOWERS` already.",
        raises=[ValidationException, NotAuthorizedException],
        media_type="text/event-stream",
    )
    async def events(
        self,
        service: Service,
        after: Annotated[
            str | None,
            Parameter(
                pattern=EVENT_ID_PATTERN,
                description="Resume after this event id (e.g. `1732838400000-0`)",
            ),
        ] = None,
        last_event_id: Annotated[
            str | None,
            HeaderParameter(
                name="Last-Event-ID",
                pattern=EVENT_ID_PATTERN,
                description="Resume after this event id (wins over `after`)",
            ),
        ] = None,
        task_id: Annotated[
            str | None,
            Parameter(pattern=TASK_ID_PATTERN, description="Only this task's events"),
        ] = None,
    ) -> ServerSentEvent:
        batches = await service.events(last_event_id or after)
        return ServerSentEvent(_event_stream(batches, task_id))


class BulkController(Controller):
    """Operations on many tasks at once. Not under ``/tasks``: ``/tasks/bulk`` would hide a
    task whose id is ``bulk``."""

    path = "/bulk"
    tags = ["tasks"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @post(
        "/tasks",
        summary="Create many tasks",
        description=f"Up to {MAX_BULK_TASKS} tasks in one request (more: 413, nothing "
        "created), for clients that submit many. Each task is validated as `POST /tasks` "
        "validates one, and created on its own: the answer has one entry per task, in "
        "order, with the status `POST /tasks` would have answered for it alone: 201 and "
        "the `task`, or 400 or 409 and the problem's `detail`. The request itself is "
        "answered 200 however many of its tasks were created. A task whose id comes "
        "earlier in the same request gets 409.",
        status_code=HTTP_200_OK,
        raises=[ValidationException, TooManyTasks, NotAuthorizedException],
    )
    async def create_tasks(
        self, data: JSONBody[BulkCreate], service: Service
    ) -> list[CreateResult]:
        if len(data.tasks) > MAX_BULK_TASKS:
            raise TooManyTasks(
                detail=f"At most {MAX_BULK_TASKS} tasks in one request, got "
                f"{len(data.tasks)}: send them in batches (nothing was created)"
            )
        results = [_validated(item) for item in data.tasks]
        specs = [spec for spec in results if isinstance(spec, TaskCreate)]
        created = iter(await service.create_each(specs))
        return [
            _created(next(created)) if isinstance(result, TaskCreate) else result
            for result in results
        ]


def _validated(item: Any) -> TaskCreate | CreateResult:
    """A bulk create's task as ``POST /tasks`` validates a body, or its 400 answer."""
    try:
        return _converted(item, TaskCreate)
    except ValidationException as exc:
        return CreateResult(status=HTTP_400_BAD_REQUEST, detail=_invalid_detail(exc))


def _created(outcome: Task | TaskAlreadyExists | ChainRefused) -> CreateResult:
    if isinstance(outcome, ChainRefused):
        return CreateResult(status=HTTP_422_UNPROCESSABLE_ENTITY, detail=str(outcome))
    if isinstance(outcome, TaskAlreadyExists):
        return CreateResult(status=HTTP_409_CONFLICT, detail=str(outcome))
    return CreateResult(status=HTTP_201_CREATED, task=_shown(outcome))


def _page(items: list[T], next_cursor: str | None) -> Response[list[T]]:
    """A page of a listing, the next page's cursor in ``X-Next-Cursor`` (none on the last)."""
    headers = {} if next_cursor is None else {"X-Next-Cursor": next_cursor}
    return Response(items, headers=headers)


def _name_unreadable(response: Response[Any], header: str, ids: Sequence[str]) -> None:
    """Name ``ids`` in ``header`` (comma-separated, each percent-encoded), if any."""
    if ids:
        response.headers[header] = ",".join(quote(item_id, safe="") for item_id in ids)


def _within_budget(items: list[T]) -> list[T]:
    """The longest prefix of ``items`` (at least one) whose JSON fits ``PAGE_BUDGET_BYTES``."""
    size = 0
    for count, item in enumerate(items):
        size += len(msgspec.json.encode(item))
        if size > PAGE_BUDGET_BYTES:
            return items[: max(count, 1)]
    return items


def _listed(run: Run, notifications: list[NotificationRecord], *, output: bool) -> RunListed:
    fields = msgspec.structs.asdict(run)
    if not output:
        del fields["output"]
    return RunListed(**fields, notifications=notifications)


async def _server_sent(
    events: AsyncGenerator[OutputEvent],
) -> AsyncGenerator[ServerSentEventMessage]:
    async with aclosing(events):
        async for event in events:
            match event:
                case OutputText(text=text):
                    yield ServerSentEventMessage(event="output", data=_json({"text": text}))
                case KeepAlive():
                    yield ServerSentEventMessage(data=None, comment="keepalive")
                case OutputEnd(run=run):
                    ended = None if run is None else msgspec.to_builtins(run)
                    if ended is not None:
                        del ended["output"]
                    yield ServerSentEventMessage(event="end", data=_json(ended))


async def _event_stream(
    batches: AsyncGenerator[EventBatch], task_id: str | None
) -> AsyncGenerator[ServerSentEventMessage]:
    """The SSE messages of the event batches; a keep-alive comment when nothing was sent
    for a while. A store outage ends the stream (the client resumes after the last id)."""
    quiet_since = anyio.current_time()
    async with aclosing(batches):
        try:
            async for batch in batches:
                if batch.missed is not None:
                    yield ServerSentEventMessage(
                        event="reset", data=_json({"oldest": batch.missed})
                    )
                shown = keep_task(batch.events, task_id)
                for event in shown:
                    yield ServerSentEventMessage(id=event.id, event=event.type, data=_json(event))
                now = anyio.current_time()
                if shown or batch.missed is not None:
                    quiet_since = now
                elif not batch.events or now - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = now
                    yield ServerSentEventMessage(data=None, comment="keepalive")
        except StoreUnavailable as exc:
            log.warning("an event stream ended: %s", exc)


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def _health_handlers(
    checks: dict[str, Check], queue_check: QueueCheck | None = None
) -> list[Callable[[], Awaitable[Any]]]:
    """``GET /health`` and ``HEAD /health``: the same checks, the same status code."""

    async def check_all() -> Health:
        results: dict[str, DependencyCheck] = {}
        queues: dict[str, QueueHealth] = {}

        async def run_check(name: str, check: Check) -> None:
            said: str | None = None

            async def checking() -> None:
                nonlocal said
                said = await check()

            outage = await probe(checking, within=HEALTH_CHECK_SECONDS)
            results[name] = (
                DependencyCheck("up", said) if outage is None else DependencyCheck("down", outage)
            )

        async with anyio.create_task_group() as tg:
            for name, check in checks.items():
                tg.start_soon(run_check, name, check)
        healthy = all(r.status == "up" for r in results.values())
        if healthy and queue_check is not None:
            # Informative only, and asked only of servers that just answered: with one
            # down, its client's retries would hold every /health to the deadline.
            with anyio.move_on_after(HEALTH_CHECK_SECONDS):
                with suppress(StoreUnavailable, BrokerUnavailable):
                    stats = await queue_check()
                    queues.update((q.queue, QueueHealth(q.depth, q.consumers)) for q in stats)
        return Health(
            "ok" if healthy else "unavailable", dict(sorted(results.items())), queues or None
        )

    def status_of(health: Health) -> dict[str, Any]:
        if health.status == "ok":
            return {"status_code": HTTP_200_OK}
        return {"status_code": HTTP_503_SERVICE_UNAVAILABLE, "headers": _retry_after()}

    down = ResponseSpec(data_container=Health, description="A dependency is down")
    common: dict[str, Any] = {"tags": ["health"], "opt": {EXCLUDE_FROM_AUTH: True}}

    @get(
        "/health",
        summary="Health of the service and its dependencies",
        responses={HTTP_503_SERVICE_UNAVAILABLE: down},
        **common,
    )
    async def health() -> Response[Health]:
        checked = await check_all()
        return Response(checked, **status_of(checked))

    @head(
        "/health",
        summary="Health as a status code alone (for load balancers)",
        responses={
            HTTP_200_OK: ResponseSpec(None, description="Every dependency is up"),
            HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(None, description="A dependency is down"),
        },
        **common,
    )
    async def health_status() -> Response[None]:
        return Response(None, **status_of(await check_all()))

    return [health, health_status]  # type: ignore[list-item]


@get("/swagger/index.html", include_in_schema=False, opt={EXCLUDE_FROM_AUTH: True})
async def swagger_redirect() -> Redirect:
    return Redirect(SCHEMA_PATH)


@get("/", include_in_schema=False, opt={EXCLUDE_FROM_AUTH: True})
async def dashboard_redirect() -> Redirect:
    """The root of the server is the dashboard."""
    return Redirect(f"{UI_PATH}/")


def _dashboard() -> Router:
    """The dashboard's static files. They need no token: the page asks for one when the
    API it calls answers 401."""
    return create_static_files_router(
        path=UI_PATH,
        directories=[UI_DIRECTORY],
        html_mode=True,
        include_in_schema=False,
        opt={EXCLUDE_FROM_AUTH: True},
    )


FOLLOWERS_RETRY_AFTER = 5
"""Seconds a client refused a live output stream is told to wait."""

_STATUS_OF: list[tuple[type[Exception], int]] = [
    (TaskNotFound, HTTP_404_NOT_FOUND),
    (UnreadableTask, HTTP_500_INTERNAL_SERVER_ERROR),
    (UnreadableRun, HTTP_500_INTERNAL_SERVER_ERROR),
    (ChainRefused, HTTP_422_UNPROCESSABLE_ENTITY),
    (RunNotFound, HTTP_404_NOT_FOUND),
    (TaskAlreadyExists, HTTP_409_CONFLICT),
    (InvalidTransition, HTTP_409_CONFLICT),
    (InvalidSchedule, HTTP_400_BAD_REQUEST),
    (InvalidCursor, HTTP_400_BAD_REQUEST),
    (InvalidWindow, HTTP_400_BAD_REQUEST),
    (TooManyScheduled, HTTP_400_BAD_REQUEST),
    (InvalidEventId, HTTP_400_BAD_REQUEST),
    (StoreContention, HTTP_503_SERVICE_UNAVAILABLE),
    (StoreUnavailable, HTTP_503_SERVICE_UNAVAILABLE),
]


def _problem(status_code: int, detail: str, **extra: object) -> Response[dict[str, object]]:
    return Response(
        {"status_code": status_code, "detail": detail, **extra},
        status_code=status_code,
        media_type=MediaType.JSON,
    )


def _retry_after(seconds: int = RETRY_AFTER_SECONDS) -> dict[str, str]:
    return {"Retry-After": str(seconds)}


def _domain_error(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, object]]:
    status = next(code for kind, code in _STATUS_OF if isinstance(exc, kind))
    response = _problem(status, str(exc))
    if status == HTTP_503_SERVICE_UNAVAILABLE:
        response.headers.update(_retry_after())
    return response


def _unreadable_document(
    request: Request[Any, Any, Any], exc: UnreadableTask | UnreadableRun
) -> Response[dict[str, object]]:
    """A task or a run whose stored document cannot be read: named in the answer, and
    logged once, with what is wrong with the document but without a traceback (the
    fault is in the data, not in the code)."""
    run_id = exc.run_id if isinstance(exc, UnreadableRun) else None
    log.error(
        "%s %s: %s: %s",
        request.method,
        request.url.path,
        exc,
        exc.reason,
        extra=about(exc.task_id, run_id),
    )
    return _domain_error(request, exc)


def _unexpected_error(
    request: Request[Any, Any, Any], exc: Exception
) -> Response[dict[str, object]]:
    """A bug: logged with its traceback, answered without a word about the internals."""
    log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return _problem(HTTP_500_INTERNAL_SERVER_ERROR, "Internal Server Error")


def _store_outage_handlers(gate: OutageGate) -> dict[type[Exception], Any]:
    """While the store is known down, ``gate`` refuses requests at once (see
    ``OutageGate``); every 503 says when to try again."""

    def store_unavailable(
        request: Request[Any, Any, Any], exc: StoreUnavailable
    ) -> Response[dict[str, object]]:
        gate.trip(exc)
        return _domain_error(request, exc)

    def known_down(_: Request[Any, Any, Any], exc: DependencyDown) -> Response[dict[str, object]]:
        response = _problem(HTTP_503_SERVICE_UNAVAILABLE, f"The store is unavailable: {exc}")
        response.headers.update(_retry_after(exc.retry_after))
        return response

    return {StoreUnavailable: store_unavailable, DependencyDown: known_down}


def _too_many_followers(
    _: Request[Any, Any, Any], exc: TooManyFollowers
) -> Response[dict[str, object]]:
    """Live output streams are capped per process (``TASKQ_MAX_FOLLOWERS``): come back soon."""
    response = _problem(HTTP_503_SERVICE_UNAVAILABLE, str(exc))
    response.headers.update(_retry_after(FOLLOWERS_RETRY_AFTER))
    return response


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, object]]:
    """Litestar's own errors (401, 404 of an unknown route, 405, 413 ...), always as JSON,
    also on routes whose success is another media type (the output event stream)."""
    extra = {"extra": exc.extra} if exc.extra else {}
    response = _problem(exc.status_code, exc.detail, **extra)
    if exc.status_code == HTTP_503_SERVICE_UNAVAILABLE:
        response.headers.update(_retry_after())
    response.headers.update(exc.headers or {})
    return response


def _validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, object]]:
    """Name the offending fields in ``detail`` itself, not only in ``extra``."""
    return _problem(HTTP_400_BAD_REQUEST, _invalid_detail(exc), extra=exc.extra or [])


def _invalid_detail(exc: ValidationException) -> str:
    """What is wrong with a request, naming the offending fields."""
    problems: list[str] = []
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, dict):
                item = cast(dict[str, Any], item)
                message = item.get("message", "invalid")
                key = item.get("key")
                if key == "data" and item.get("source") == "body":
                    # Litestar's word for an empty body: the handler's ``data`` is missing.
                    problems.append("a JSON body is required")
                else:
                    problems.append(f"{message} ({key})" if key else str(message))
    return f"Invalid request: {'; '.join(problems) or exc.detail}"


def create_app(
    service: TaskService,
    *,
    checks: dict[str, Check],
    queue_check: QueueCheck | None = None,
    tokens: Sequence[str] = (),
    body_seconds: float = DEFAULT_BODY_SECONDS,
    debug: bool = False,
) -> Litestar:
    """The Litestar application around ``service``; ``checks`` feed ``/health``, and the
    ``store`` check also tells when the store is down or back (see ``OutageGate``);
    ``queue_check`` gives the queues ``/health`` shows.

    With ``tokens``, requests need one of them as a bearer token (see the module docstring);
    without, the API is open. A request body must arrive within ``body_seconds``.
    """
    store_gate = OutageGate(
        checks["store"], probe_every=STORE_PROBE_SECONDS, probe_budget=HEALTH_CHECK_SECONDS
    )

    async def admit_while_store_down(_: Request[Any, Any, Any]) -> None:
        # A hook before the handler rather than a guard: Litestar copies the route
        # handler for every guard call, a cost each request paid for a gate nearly
        # always open. The hook runs where a guard would, before the body is read.
        await store_gate.admit()

    # The document declares the scheme only where the server enforces it.
    security: list[SecurityRequirement] = [{BEARER_SCHEME: []}] if tokens else []
    bearer = SecurityScheme(
        type="http", scheme="bearer", description="One of the server's TASKQ_API_TOKENS"
    )
    auth = DefineMiddleware(BearerTokenAuth, tokens=tokens, exclude_from_auth_key=EXCLUDE_FROM_AUTH)
    app = Litestar(
        route_handlers=[
            Router(
                "/",
                route_handlers=[TaskController, BulkController, EventController],
                security=security,
                before_request=admit_while_store_down,
            ),
            *_health_handlers({**checks, "store": store_gate.check_now}, queue_check),
            swagger_redirect,
            metrics_handler(opt={EXCLUDE_FROM_AUTH: True}),
            dashboard_redirect,
            _dashboard(),
        ],
        middleware=[
            BodyDeadline(body_seconds),
            AllowEveryMethod(),
            *([auth] if tokens else []),
        ],
        request_class=StrictJSONRequest,
        dependencies={"service": Provide(lambda: service, use_cache=True, sync_to_thread=False)},
        # While the app is served, concurrent creates of one task reach the store together.
        lifespan=[lambda _: service.creating_together()],
        exception_handlers={
            DomainError: _domain_error,
            UnreadableTask: _unreadable_document,
            UnreadableRun: _unreadable_document,
            StoreContention: _domain_error,
            **_store_outage_handlers(store_gate),
            TooManyFollowers: _too_many_followers,
            HTTPException: _http_error,
            ValidationException: _validation_error,
            Exception: _unexpected_error,
        },
        openapi_config=OpenAPIConfig(
            title="taskq",
            version="0.1.0",
            description="A distributed scheduler for shell-command tasks.",
            path=SCHEMA_PATH,
            render_plugins=[SwaggerRenderPlugin(path="/")],
            openapi_router=Router(
                SCHEMA_PATH,
                route_handlers=[],
                include_in_schema=False,
                opt={EXCLUDE_FROM_AUTH: True},
            ),
            components=Components(security_schemes={BEARER_SCHEME: bearer} if tokens else None),
        ),
        request_max_body_size=MAX_BODY_BYTES,
        # The process configures logging once (the CLI); the app only emits records.
        logging_config=None,
        debug=debug,
    )
    describe_contract(app.openapi_schema, max_body_bytes=MAX_BODY_BYTES)
    # Around Litestar's own handler rather than a middleware: a middleware runs only for
    # a route that matched, and requests no route matched (404) are counted too.
    app.asgi_handler = RequestMetrics(app.asgi_handler)
    return app

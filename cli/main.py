"""The ``taskq`` command: run the service (``serve``, ``dev``) or talk to its API."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import wraps
from typing import IO, Any, ParamSpec, TypeVar, cast

import anyio
import asyncclick as click

from app.config import MEMORY_URL, ConfigError, Settings, parse_queues, parse_roles
from app.event_loops import (
    BACKEND_VARIABLE,
    BACKENDS,
    SERVER_BACKENDS,
    BackendError,
    anyio_run_options,
    default_backend,
    requested_backend,
    running_backend,
)
from app.logs import configure_logging
from app.metrics_directory import metrics_directory
from app.schemas import MAX_BULK_TASKS
from app.startup import service_environment
from cli.bulk import batches, read_tasks
from cli.chains import chain_body, chain_notes, chain_options, chain_summary, triggered_by_note
from cli.client import ApiClient, ApiError, open_client

P = ParamSpec("P")
T = TypeVar("T")

NOTE_WIDTH = 60  # characters of a run's error shown in the runs table
RUNS_SEARCHED = 20  # runs `logs` looks through for the newest one that ran
UPCOMING_PAGE = 1000  # fires `upcoming` asks for per request (the API's most)
MAX_UPCOMING_SHOWN = 100_000


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--api-url",
    envvar="TASKQ_API_URL",
    default="http://localhost:8080",
    show_default=True,
    help="The taskq API the client commands talk to (env TASKQ_API_URL).",
)
@click.option("--token", envvar="TASKQ_TOKEN", help="Bearer token for the API (env TASKQ_TOKEN).")
@click.pass_context
async def cli(ctx: click.Context, api_url: str, token: str | None) -> None:
    """taskq: a distributed scheduler for shell-command tasks."""
    ctx.obj = {"api_url": api_url, "token": token}


# --------------------------------------------------------------------------- service


async def _run(settings: Settings, *, supervised: bool = False) -> None:
    # Before the service's imports: prometheus_client reads its directory at import.
    with metrics_directory(several_processes=settings.spawns_consumer_processes()):
        from app.supervisor import (
            freeze_start_up,
            root_cause,
            run_service,
            tune_allocator,
            tune_collector,
        )

        tune_collector()
        tune_allocator()
        try:
            await run_service(settings, supervised=supervised, on_ready=freeze_start_up)
        except Exception as exc:
            # The last line of the log, in its format (a crash of a running role was
            # logged by the supervisor with its traceback).
            why = str(exc) if isinstance(exc, ConfigError) else f"taskq stopped: {root_cause(exc)}"
            logging.getLogger("taskq").error(why)
            raise SystemExit(1) from None


def _backend_option(choices: Sequence[str]) -> Callable[[Callable[P, T]], Callable[P, T]]:
    return click.option(
        "--backend",
        type=click.Choice(choices),
        envvar=BACKEND_VARIABLE,
        default=default_backend(),
        show_default=True,
        help=f"Event loop to run on (env {BACKEND_VARIABLE}; uvloop where installed).",
    )


_queues_option = click.option(
    "--queues",
    help="Queues (worker pools) the consumer role serves, comma-separated, each with its own"
    " concurrency if given: build=4,deploy (env TASKQ_QUEUES; default: default).",
)


def _service_options(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    for option in reversed(
        [
            click.option("--host", help="API address (env SERVER_HOST, default 127.0.0.1)."),
            click.option("--port", type=int, help="API port (env SERVER_PORT, default 8080)."),
            click.option(
                "--concurrency",
                type=click.IntRange(min=1),
                help="Commands each consumer process runs at once (env TASKQ_CONCURRENCY;"
                " default 2 x cores in all, shared by the consumer processes).",
            ),
        ]
    ):
        function = option(function)
    return function


@cli.command()
@click.option(
    "--roles",
    help="Comma-separated roles to run: api, scheduler, consumer (env TASKQ_ROLES; default all).",
)
@click.option("--redis-url", help="Store URL (env REDIS_URL).")
@click.option("--amqp-url", help="Broker URL (env AMQP_URL).")
@click.option(
    "--key-prefix", help="Prefix of every Redis key and AMQP name (env TASKQ_KEY_PREFIX)."
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    help="Consumer processes (env TASKQ_PROCESSES; default one per usable core, 1 with a"
    " memory:// store or broker). With 1,"
    " every role runs in this one process; above 1, this process runs the other roles and"
    " supervises that many consumer processes. Ignored when the roles exclude consumer.",
)
# A consumer process started by `taskq serve --processes N`: its stdin and stdout are the
# parent's pipes (app.consumer_processes).
@click.option("--supervised", is_flag=True, hidden=True)
@_backend_option(SERVER_BACKENDS)
@_queues_option
@_service_options
async def serve(
    backend: str,
    roles: str | None,
    queues: str | None,
    redis_url: str | None,
    amqp_url: str | None,
    key_prefix: str | None,
    processes: int | None,
    supervised: bool,
    host: str | None,
    port: int | None,
    concurrency: int | None,
) -> None:
    """Run the service against Redis and RabbitMQ (all roles unless --roles), its
    consumer role in one process per core unless --processes."""
    assert running_backend() == backend
    try:
        settings = Settings.from_env(service_environment()).with_overrides(
            roles=None if roles is None else parse_roles(roles),
            queues=None if queues is None else parse_queues(queues),
            store_url=redis_url,
            broker_url=amqp_url,
            key_prefix=key_prefix,
            host=host,
            port=port,
            concurrency=concurrency,
            processes=processes,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    configure_logging(settings.log_format, supervised=supervised)
    await _run(settings, supervised=supervised)


@cli.command()
@_backend_option(BACKENDS)
@_queues_option
@_service_options
async def dev(
    backend: str,
    queues: str | None,
    host: str | None,
    port: int | None,
    concurrency: int | None,
) -> None:
    """Run every role in this process with an in-memory store and broker.

    Nothing else is needed, and nothing survives the exit. Always one process:
    TASKQ_PROCESSES is ignored.
    """
    assert running_backend() == backend
    try:
        settings = Settings.from_env(service_environment()).with_overrides(
            queues=None if queues is None else parse_queues(queues),
            host=host,
            port=port,
            concurrency=concurrency,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    configure_logging(settings.log_format)
    settings = settings.with_overrides(store_url=MEMORY_URL, broker_url=MEMORY_URL, processes=1)
    logging.getLogger("taskq").warning(
        "DEV MODE: tasks live in this process's memory only; NOTHING SURVIVES EXIT"
    )
    await _run(settings)


# --------------------------------------------------------------------------- client


def _client_command(
    function: Callable[..., Awaitable[None]],
) -> Callable[..., Awaitable[None]]:
    """Adds ``--json``, opens the API client, and turns API errors into exit code 1."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.pass_context
    @wraps(function)
    async def command(ctx: click.Context, /, *args: Any, **kwargs: Any) -> None:
        try:
            async with open_client(ctx.obj["api_url"], ctx.obj["token"]) as client:
                await function(client, *args, **kwargs)
        except ApiError as exc:
            raise click.ClickException(str(exc)) from exc

    return command


def _emit(value: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    click.echo(json.dumps(value, indent=2) if as_json else human(value))


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--env")
        env[name] = value
    return env


def _program_options(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    for option in reversed(
        [
            click.option("--description", help="Free text."),
            click.option("--command", help="Shell command, run with sh -c."),
            click.option(
                "--arg",
                "args",
                multiple=True,
                help="Run this argv without a shell instead of --command (repeat per argument).",
            ),
            click.option("--env", multiple=True, help="NAME=VALUE for the command (repeatable)."),
            click.option("--cwd", help="Working directory of the command."),
            click.option("--timeout", type=float, help="Seconds before the command is killed."),
            click.option(
                "--max-attempts", type=int, help="Runs before a failing task is failed (1-100)."
            ),
            click.option(
                "--retry-backoff",
                type=float,
                help="Least seconds before the 2nd attempt; doubles each time, jitter adds.",
            ),
            click.option(
                "--success-exit-code",
                "success_exit_codes",
                type=int,
                multiple=True,
                help="An exit code that counts as success (repeatable; default 0).",
            ),
            click.option(
                "--misfire",
                type=click.Choice(["coalesce", "skip"]),
                help="Recurring fires missed by more than the grace time: run once "
                "(coalesce, the default) or skip them.",
            ),
            click.option(
                "--misfire-grace",
                type=float,
                help="Seconds a fire may be late and still run (default 60).",
            ),
            click.option(
                "--overlap",
                type=click.Choice(["queue", "forbid"]),
                help="A fire due while the previous run has not ended: run it right after "
                "(queue, the default) or skip it (forbid).",
            ),
            click.option(
                "--queue",
                help="The queue (worker pool) its runs go to: only consumers serving it "
                "(taskq serve --queues) run them (default: default).",
            ),
        ]
    ):
        function = option(function)
    return function


def _program_body(
    description: str | None,
    command: str | None,
    args: Sequence[str],
    env: Sequence[str],
    cwd: str | None,
    timeout: float | None,
    max_attempts: int | None,
    retry_backoff: float | None,
    success_exit_codes: Sequence[int],
    misfire: str | None,
    misfire_grace: float | None,
    overlap: str | None,
    queue: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "description": description,
        "command": command,
        "args": list(args) or None,
        "env": _env_pairs(env) or None,
        "cwd": cwd,
        "timeout": timeout,
        "max_attempts": max_attempts,
        "retry_backoff": retry_backoff,
        "success_exit_codes": list(success_exit_codes) or None,
        "misfire": misfire,
        "misfire_grace": misfire_grace,
        "overlap": overlap,
        "queue": queue,
    }
    return {k: v for k, v in body.items() if v is not None}


_NOTIFY_URLS = {
    "on_start": "when a run starts",
    "on_success": "when a run completes",
    "on_failure": "when the task's run fails for good (after its last attempt)",
    "on_not_started": "when a run could not start (or a fire was skipped)",
    "on_still_running": "once when a run still runs --still-running-after seconds after it started",
    "success_ping": "GET without a body when a run completes (healthchecks.io, Cronitor)",
}


def _notify_options(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    options = [
        click.option(f"--{event.replace('_', '-')}", event, metavar="URL", help=f"Webhook {what}.")
        for event, what in _NOTIFY_URLS.items()
    ]
    options += [
        click.option(
            "--still-running-after",
            type=float,
            metavar="SECONDS",
            help="With --on-still-running: seconds after the start.",
        ),
        click.option("--no-notify", is_flag=True, help="Remove every notification (update)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _notify_body(
    current: dict[str, Any] | None,
    *,
    still_running_after: float | None,
    no_notify: bool,
    **urls: str | None,
) -> dict[str, Any] | None:
    """The task's ``notify`` with the options given over ``current``; ``None`` when
    none was given (nothing to change)."""
    if no_notify:
        return {}
    given = {event: url for event, url in urls.items() if url is not None}
    if not given and still_running_after is None:
        return None
    current = current or {}
    notify: dict[str, Any] = {**current, **given}
    before = cast(dict[str, Any], current.get("on_still_running") or {})
    url = given.get("on_still_running", before.get("url"))
    after = before.get("after") if still_running_after is None else still_running_after
    notify.pop("on_still_running", None)
    if url is not None or after is not None:
        if url is None or after is None:
            raise click.UsageError("--on-still-running and --still-running-after go together")
        notify["on_still_running"] = {"url": url, "after": after}
    return notify


@cli.command()
@click.option("--id", "task_id", help="Task id (generated when omitted).")
@click.option("--name", help="Human-readable name (required unless --from).")
@_program_options
@_notify_options
@chain_options
@click.option("--at", help="Schedule for this time (RFC 3339, e.g. 2025-12-01T15:00:00Z).")
@click.option(
    "--from",
    "from_file",
    type=click.File("r"),
    help="Create every task in FILE instead ('-': standard input): JSON lines or a JSON "
    "array of task bodies as POST /tasks takes them. Sent in batches of up to "
    f"{MAX_BULK_TASKS}; one line per task; exit code 1 if any was not created.",
)
@_client_command
async def create(
    client: ApiClient,
    task_id: str | None,
    name: str | None,
    at: str | None,
    from_file: IO[str] | None,
    as_json: bool,
    still_running_after: float | None,
    no_notify: bool,
    **program: Any,
) -> None:
    """Create a task (or, with --from, many)."""
    urls = {event: program.pop(event) for event in _NOTIFY_URLS}
    notify = _notify_body(None, still_running_after=still_running_after, no_notify=False, **urls)
    chain = chain_body(None, **_chain_given(program))
    body = {"id": task_id, "name": name, "scheduled_at": at, **_program_body(**program)}
    body = {"notify": notify or None, "chain": chain or None, **body}
    body = {k: v for k, v in body.items() if v is not None}
    if from_file is not None:
        if body:
            raise click.UsageError(
                "--from takes every task from the file: give no other task option"
            )
        await _create_from(client, from_file, as_json)
        return
    if name is None:
        raise click.UsageError("Missing option '--name' (or give --from FILE).")
    _emit(await client.create_task(body), as_json, _task_details)


async def _create_from(client: ApiClient, source: IO[str], as_json: bool) -> None:
    """Create the tasks in ``source`` in batches; print each one's answer as it comes."""
    try:
        bodies = read_tasks(source.read())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--from") from None
    if not bodies:
        raise click.BadParameter("no tasks in the file", param_hint="--from")
    answers: list[Any] = []
    for first, batch in batches(bodies):
        try:
            batch_answers = await client.create_tasks(batch)
        except ApiError as exc:
            if exc.status_code != 413:  # a batch too large: its tasks fail, the rest goes on
                raise
            batch_answers = [{"status": 413, "detail": str(exc)}] * len(batch)
        for number, answer in enumerate(batch_answers, start=first + 1):
            if not as_json:
                click.echo(_created_line(number, bodies[number - 1], answer))
        answers += batch_answers
    if as_json:
        click.echo(json.dumps(answers, indent=2))
    failed = sum(answer["status"] != 201 for answer in answers)
    if failed:
        raise click.ClickException(f"{failed} of {len(bodies)} tasks were not created")


def _created_line(number: int, body: Any, answer: dict[str, Any]) -> str:
    if answer["status"] == 201:
        return f"{number}: created {answer['task']['id']}"
    task_id = cast(dict[str, Any], body).get("id") if isinstance(body, dict) else None
    named = "" if task_id is None else f" {task_id}"
    return f"{number}:{named} not created: {answer['detail']} (HTTP {answer['status']})"


@cli.command(name="list")
@click.option(
    "--status",
    type=click.Choice(["created", "pending", "running", "completed", "failed", "cancelled"]),
)
@click.option("--queue", help="Only the tasks of this queue (worker pool).")
@click.option("--limit", type=click.IntRange(1, 1000), help="Tasks per page.")
@click.option("--cursor", help="Continue from this cursor (printed after a page).")
@click.option("--all", "every_page", is_flag=True, help="Follow the cursor to the last page.")
@_client_command
async def list_tasks(
    client: ApiClient,
    status: str | None,
    queue: str | None,
    limit: int | None,
    cursor: str | None,
    every_page: bool,
    as_json: bool,
) -> None:
    """List tasks, in id order."""
    tasks, next_cursor, unreadable = await client.list_tasks(
        status=status, limit=limit, cursor=cursor, queue=queue
    )
    while every_page and next_cursor:
        more, next_cursor, more_unreadable = await client.list_tasks(
            status=status, limit=limit, cursor=next_cursor, queue=queue
        )
        tasks += more
        unreadable += more_unreadable
    _emit(tasks, as_json, _task_table)
    if unreadable:
        # On stderr, with --json too: the JSON stays the list of tasks.
        click.echo(
            f"not listed: {len(unreadable)} task(s) whose stored document cannot be read: "
            f"{', '.join(unreadable)} (taskq delete --id ID removes one)",
            err=True,
        )
    if next_cursor and not as_json:
        click.echo(f"more: taskq list --cursor {next_cursor}", err=True)


@cli.command()
@click.option("--from", "start", help="RFC 3339 time (default: now).")
@click.option("--to", "end", help="RFC 3339 time (default: 24 h after --from; at most 7 days).")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_UPCOMING_SHOWN),
    default=100,
    show_default=True,
    help="Fires shown at most.",
)
@_client_command
async def upcoming(
    client: ApiClient, start: str | None, end: str | None, limit: int, as_json: bool
) -> None:
    """List the fires due in a window, recurrences expanded, in time order."""
    fires: list[Any] = []
    cursor: str | None = None
    while True:
        page_size = min(limit - len(fires), UPCOMING_PAGE)
        page, cursor = await client.upcoming(
            start=None if cursor else start,
            end=None if cursor else end,
            limit=page_size,
            cursor=cursor,
        )
        fires += page
        if cursor is None or len(fires) >= limit:
            break
    _emit(fires, as_json, _fire_table)
    if cursor is not None and not as_json:
        click.echo(f"more fires after {fires[-1]['due_at']}: raise --limit", err=True)


@cli.command()
@click.option("--id", "task_id", required=True)
@_client_command
async def get(client: ApiClient, task_id: str, as_json: bool) -> None:
    """Show one task."""
    _emit(await client.get_task(task_id), as_json, _task_details)


@cli.command()
@click.option("--id", "task_id", required=True)
@click.option("--name")
@_program_options
@_notify_options
@chain_options
@_client_command
async def update(
    client: ApiClient,
    task_id: str,
    name: str | None,
    as_json: bool,
    still_running_after: float | None,
    no_notify: bool,
    **program: Any,
) -> None:
    """Change a task; options not given stay as they are (notifications too: each
    --on-... option replaces that one only)."""
    urls = {event: program.pop(event) for event in _NOTIFY_URLS}
    chain_given = _chain_given(program)
    body = {"name": name, **_program_body(**program)}
    body = {k: v for k, v in body.items() if v is not None}
    if any(chain_given.values()):
        current = None if chain_given["no_chain"] else await client.get_task(task_id)
        chain = chain_body(current and current.get("chain"), **chain_given)
        body["chain"] = chain or None
    if no_notify or still_running_after is not None or any(urls.values()):
        current = None if no_notify else (await client.get_task(task_id)).get("notify")
        notify = _notify_body(
            current, still_running_after=still_running_after, no_notify=no_notify, **urls
        )
        body["notify"] = notify or None
    if not body:
        raise click.UsageError("nothing to update: give at least one option")
    _emit(await client.update_task(task_id, body), as_json, _task_details)


@cli.command()
@click.option("--id", "task_id", required=True)
@_client_command
async def delete(client: ApiClient, task_id: str, as_json: bool) -> None:
    """Delete a task and its runs."""
    await client.delete_task(task_id)
    _emit({"deleted": task_id}, as_json, lambda _: f"deleted {task_id}")


@cli.command()
@click.option("--id", "task_id", required=True)
@_client_command
async def execute(client: ApiClient, task_id: str, as_json: bool) -> None:
    """Run a task now."""
    run = await client.execute_task(task_id)
    _emit(run, as_json, lambda r: f"queued run {r['run_id']} of {r['task_id']}")


@cli.command()
@click.option("--id", "task_id", required=True)
@click.option("--at", help="Once, at this time (RFC 3339, e.g. 2025-12-01T15:00:00Z).")
@click.option("--cron", help="On a cron expression: 5 fields, or 6 with leading seconds.")
@click.option("--timezone", help="Time zone of --cron (IANA name, default UTC).")
@click.option("--every", type=float, help="Every this many seconds.")
@click.option("--start", help="Recurrence: not before this time (RFC 3339).")
@click.option("--end", help="Recurrence: not after this time (RFC 3339).")
@_client_command
async def schedule(
    client: ApiClient,
    task_id: str,
    at: str | None,
    cron: str | None,
    timezone: str | None,
    every: float | None,
    start: str | None,
    end: str | None,
    as_json: bool,
) -> None:
    """Schedule a task: once (--at) or on a recurrence (--cron or --every)."""
    if sum(option is not None for option in (at, cron, every)) != 1:
        raise click.UsageError("give exactly one of --at, --cron and --every")
    body = {"at": at, "cron": cron, "timezone": timezone, "every": every}
    body |= {"start": start, "end": end}
    task = await client.schedule_task(task_id, {k: v for k, v in body.items() if v is not None})
    _emit(task, as_json, _task_details)


@cli.command()
@click.option("--id", "task_id", required=True)
@_client_command
async def cancel(client: ApiClient, task_id: str, as_json: bool) -> None:
    """Cancel a task's queued or running run (stopped wherever it runs)."""
    _emit(await client.post_action(task_id, "cancel"), as_json, _task_details)


@cli.command()
@click.option("--id", "task_id", required=True)
@_client_command
async def pause(client: ApiClient, task_id: str, as_json: bool) -> None:
    """Pause a task's schedule (running it by hand still works)."""
    _emit(await client.post_action(task_id, "pause"), as_json, _task_details)


@cli.command()
@click.option("--id", "task_id", required=True)
@_client_command
async def resume(client: ApiClient, task_id: str, as_json: bool) -> None:
    """Resume a paused schedule (fires missed meanwhile are skipped)."""
    _emit(await client.post_action(task_id, "resume"), as_json, _task_details)


@cli.command()
@click.option("--id", "task_id", required=True)
@_client_command
async def unschedule(client: ApiClient, task_id: str, as_json: bool) -> None:
    """Drop a task's schedule (a run already queued or running goes on)."""
    _emit(await client.unschedule_task(task_id), as_json, _task_details)


@cli.command()
@click.option("--id", "task_id", required=True)
@click.option("--run", "run_id", help="Show this run with its output.")
@click.option("--limit", type=click.IntRange(1, 1000), help="How many runs (newest first).")
@_client_command
async def runs(
    client: ApiClient, task_id: str, run_id: str | None, limit: int | None, as_json: bool
) -> None:
    """Show a task's runs, newest first (or one run with its output)."""
    if run_id is not None:
        _emit(await client.get_run(task_id, run_id), as_json, _run_details)
    else:
        # Scripts reading --json get each run's output; the table shows none.
        listed, unreadable = await client.list_runs(task_id, limit=limit, output=as_json)
        _emit(listed, as_json, _run_table)
        if unreadable:
            # On stderr, with --json too: the JSON stays the list of runs.
            click.echo(
                f"not listed: run(s) whose stored document cannot be read: {', '.join(unreadable)}",
                err=True,
            )


@cli.command()
@click.option("--id", "task_id", required=True)
@click.option("--run", "run_id", help="Which run (default: the active run, else the newest).")
@click.option("--follow", "-f", is_flag=True, help="Stream the output live until the run ends.")
@_client_command
async def logs(
    client: ApiClient, task_id: str, run_id: str | None, follow: bool, as_json: bool
) -> None:
    """Print the output of a run; with --follow, as it is printed, until the run ends."""
    run_id = run_id or await _current_run_id(client, task_id)
    if as_json and not follow:
        _emit(await client.get_run(task_id, run_id), as_json, str)
        return
    ended: dict[str, Any] | None = None
    last = "\n"
    async for event, data in client.run_output(task_id, run_id, follow=follow):
        if as_json:
            click.echo(json.dumps({"event": event, "data": data}))
        elif event == "output" and data["text"]:
            last = data["text"]
            sys.stdout.write(last)
            sys.stdout.flush()
        if event == "end":
            ended = data or {}
            break
    if not as_json and not last.endswith("\n"):
        click.echo()
    if follow and ended is None:
        raise click.ClickException(f"the output stream of run {run_id} ended before the run")
    if follow and not as_json:
        if not ended:
            click.echo(f"run {run_id} was deleted", err=True)
        else:
            exit_code = "-" if ended["exit_code"] is None else ended["exit_code"]
            note = f": {ended['error']}" if ended.get("error") else ""
            click.echo(f"run {run_id} {ended['status']} (exit {exit_code}){note}", err=True)


RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0)
"""Seconds ``events`` waits before each reconnection attempt (the last one repeats)."""
RECONNECT_FOR = 60.0
"""Seconds ``events`` goes on trying to reconnect before it gives up."""


@cli.command()
@click.option("--task", "task_id", help="Only this task's events.")
@click.option("--after", help="Start after this event id (default: with what happens next).")
@_client_command
async def events(client: ApiClient, task_id: str | None, after: str | None, as_json: bool) -> None:
    """Follow task and run lifecycle events as they happen, until interrupted.

    One line per event (time, type, task, run, status or outcome), or with --json one JSON
    object a line. When the connection drops, it reconnects and goes on after the last
    event printed."""
    connected = False
    failing_since: float | None = None
    while True:
        try:
            async for kind, event_id, data in client.events(after=after, task_id=task_id):
                connected, failing_since = True, None
                if kind == "reset":
                    click.echo(
                        f"events after {after} are no longer kept: going on from the oldest "
                        f"kept ({data['oldest']})",
                        err=True,
                    )
                    continue
                click.echo(json.dumps(data) if as_json else _event_line(data))
                after = event_id or after
        except ApiError as exc:
            if exc.status_code not in (None, 503) or not connected:
                raise
            now = anyio.current_time()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > RECONNECT_FOR:
                raise ApiError(f"{exc} (gave up reconnecting after {RECONNECT_FOR:g} s)") from exc
            attempt = min(int(now - failing_since), len(RECONNECT_DELAYS) - 1)
            click.echo(f"{exc}; reconnecting", err=True)
            await anyio.sleep(RECONNECT_DELAYS[attempt])


def _event_line(event: dict[str, Any]) -> str:
    """An event in words: time, type, task, then its run and how it stands."""
    parts = [event["at"], f"{event['type']:<12}", event["task_id"]]
    if "run_id" in event:
        parts.append(f"run {event['run_id']} (attempt {event['attempt']})")
    if "outcome" in event:
        details = [f"exit {event['exit_code']}" if "exit_code" in event else ""]
        details.append(f"{event['duration']:.2f} s" if "duration" in event else "")
        shown = ", ".join(d for d in details if d)
        parts.append(event["outcome"] + (f" ({shown})" if shown else ""))
    elif "run_status" in event:
        parts.append(event["run_status"])
    elif "task_status" in event:
        parts.append(event["task_status"])
    return "  ".join(parts)


async def _current_run_id(client: ApiClient, task_id: str) -> str:
    """The task's active run (queued or running), else its newest that ran."""
    active = (await client.get_task(task_id)).get("active_run")
    if active:
        return cast(str, active["run_id"])
    newest, _ = await client.list_runs(task_id, limit=RUNS_SEARCHED)
    if not newest:
        raise click.ClickException(f"task {task_id!r} has no runs yet")
    ran = [run for run in newest if run["status"] != "skipped"] or newest
    return cast(str, ran[0]["run_id"])


# --------------------------------------------------------------------------- formatting


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _short_time(value: str | None) -> str:
    return "-" if value is None else value.replace("T", " ")[:19]


def _last_run(task: dict[str, Any]) -> str:
    last = task.get("last_run")
    if not last:
        return "-"
    return f"{last['status']} (exit {last['exit_code']})"


def _task_table(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return "no tasks"
    rows = [
        [
            t["id"],
            t["name"],
            t["status"],
            t.get("queue", "default"),
            _short_time(t.get("scheduled_at")),
            _last_run(t),
        ]
        for t in tasks
    ]
    return _table(rows, ["ID", "NAME", "STATUS", "QUEUE", "SCHEDULED", "LAST RUN"])


def _fire_table(fires: list[dict[str, Any]]) -> str:
    if not fires:
        return "no fires due"
    rows = [
        [
            _short_time(f["due_at"]),
            f["task_id"],
            f["name"],
            ("yes" if f["recurring"] else "no") + (" (retry)" if f.get("retry") else ""),
        ]
        for f in fires
    ]
    return _table(rows, ["DUE (UTC)", "TASK", "NAME", "RECURRING"])


def _task_details(task: dict[str, Any]) -> str:
    program = task["command"] if task.get("command") is not None else json.dumps(task["args"])
    fields = [
        ("id", task["id"]),
        ("name", task["name"]),
        ("status", task["status"]),
        ("command" if task.get("command") is not None else "args", program),
        ("description", task.get("description") or "-"),
        ("scheduled at", task.get("scheduled_at") or "-"),
        ("recurrence", _recurrence(task.get("schedule"))),
        ("in words", task.get("schedule_description") or "-"),
        ("next runs", ", ".join(task.get("next_runs") or []) or "-"),
        ("paused", "yes" if task.get("paused") else "no"),
        ("misfire", f"{task['misfire']} (grace {task['misfire_grace']:g} s)"),
        ("overlap", task["overlap"]),
        ("queue", task.get("queue", "default")),
        ("timeout", task.get("timeout") or "-"),
        ("attempts", f"{task['max_attempts']} (backoff {task['retry_backoff']:g} s)"),
        ("retry at", task.get("retry_at") or "-"),
        ("cwd", task.get("cwd") or "-"),
        ("env", ", ".join(f"{k}={v}" for k, v in _env_of(task).items()) or "-"),
        ("notify", _notify_summary(task.get("notify"))),
        ("chain", chain_summary(task.get("chain"))),
        ("last run", _last_run(task)),
        ("created", task["created_at"]),
        ("updated", task["updated_at"]),
    ]
    return "\n".join(f"{label + ':':<14}{value}" for label, value in fields)


def _recurrence(schedule: dict[str, Any] | None) -> str:
    if not schedule:
        return "-"
    what = (
        f"cron {schedule['cron']} ({schedule['timezone']})"
        if schedule.get("cron")
        else f"every {schedule['every']:g} s"
    )
    bounds = [f"{word} {schedule[word]}" for word in ("start", "end") if schedule.get(word)]
    return ", ".join([what, *bounds])


def _chain_given(options: dict[str, Any]) -> dict[str, Any]:
    """Take the chain options out of ``options``."""
    return {name: options.pop(name) for name in ("chain_success", "chain_failure", "no_chain")}


def _notify_summary(notify: dict[str, Any] | None) -> str:
    if not notify:
        return "-"
    parts = [
        f"{event} {value['url']} after {value['after']:g} s"
        if isinstance(value, dict)
        else f"{event} {value}"
        for event, value in notify.items()
    ]
    return ", ".join(parts)


def _env_of(task: dict[str, Any]) -> dict[str, str]:
    return cast(dict[str, str], task.get("env") or {})


def _run_table(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "no runs"
    rows = [
        [
            r["run_id"],
            str(r["attempt"]),
            r["status"],
            "-" if r["exit_code"] is None else str(r["exit_code"]),
            "-" if r["duration"] is None else f"{r['duration']:.3f}s",
            _short_time(r.get("started_at")),
            r.get("worker") or "-",
            _shorten(r.get("error") or triggered_by_note(r), NOTE_WIDTH),
        ]
        for r in runs
    ]
    headers = ["RUN", "ATTEMPT", "STATUS", "EXIT", "DURATION", "STARTED", "WORKER", "NOTE"]
    return _table(rows, headers)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _run_details(run: dict[str, Any]) -> str:
    head = _run_table([run])
    notes = [note for note in (run.get("error"),) if note]
    if run.get("truncated"):
        notes.append("output truncated (head and tail kept)")
    records = cast(list[dict[str, Any]], run.get("notifications") or [])
    notes += [_delivery_note(record) for record in records]
    notes += chain_notes(run)
    body = run["output"].rstrip("\n")
    return "\n".join([head, *(f"note: {n}" for n in notes), "", body])


def _delivery_note(record: dict[str, Any]) -> str:
    """How one notification of a run went, in a line."""
    tries = f"{record['attempts']} attempt" + ("" if record["attempts"] == 1 else "s")
    line = f"{record['event']} to {record['url']}: {record['state']} ({tries})"
    return line + (f", last error: {record['last_error']}" if record.get("last_error") else "")


def main() -> None:
    # The loop must exist before the command line is parsed: --backend is read here,
    # and the command's own option checks it again (and names the choices).
    try:
        backend = requested_backend(sys.argv[1:], os.environ)
    except BackendError as exc:
        sys.exit(f"Error: {exc}")
    name, options = anyio_run_options(backend)
    cli(_anyio_backend=name, _anyio_backend_options=options)

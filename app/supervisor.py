"""One process, one task group: the roles this process plays, started in order and
stopped in order.

SIGINT/SIGTERM set ``stopping``: the API stops accepting, the scheduler stops
claiming, the consumer stops taking messages and gives running commands their grace
period. A role that raises takes the whole process down (non-zero exit) so that the
orchestrator restarts it, rather than limping on without it.

With ``processes`` above 1, the consumer role is that many processes of its own
(``app.consumer_processes``), each a role of this process's task group.

The HTTP stack (Hypercorn, Litestar and the app) is imported by the roles that serve
HTTP, when they start, not with this module: a process without one (each consumer
process) goes without it (measured: 55 MiB resident against 62, and a fifth less CPU
to import what it runs).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskStatus as StartedStatus

from app.adapters import open_broker, open_store
from app.config import MEMORY_URL, ConfigError, Settings
from app.consumer import Consumer
from app.consumer_processes import parent_gone, report_ready, run_consumer_process
from app.event_loops import running_backend
from app.metrics import METRICS_PATH, describe_process, sample
from app.notifier import NO_SECRET_WARNING, Notifier
from app.pools import pool_stats
from app.ports import DEFAULT_QUEUE, Broker, Store
from app.scheduler import Scheduler
from app.service import TaskService
from app.startup import stop_requested
from app.stopping import cancel_when_set
from app.watchdog import Watchdog, watching_commands

log = logging.getLogger("taskq")

# After the grace period, how long the orderly stop may take before it is forced.
STOP_MARGIN_SECONDS = 5.0
OPEN_API_WARNING = "TASKQ_API_TOKENS is not set: the API is open to anyone who can reach it"


class RoleCrashed(Exception):
    """A role stopped with an error; the process exits non-zero."""


async def serve_http(
    app: Any,
    *,
    host: str,
    port: int,
    stopping: anyio.Event,
    task_status: StartedStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with Hypercorn until ``stopping`` is set; reports the bound port."""
    # Imported here, as the app is: see the module's docstring.
    from hypercorn.config import Config as HypercornConfig

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    bound_port: int = sock.getsockname()[1]
    config = HypercornConfig()
    # Binding here rather than in Hypercorn means "started" is only reported once the
    # port really accepts connections, and port 0 reports the port the kernel chose.
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 3.0
    task_status.started(bound_port)
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio import serve as serve_trio  # pyright: ignore[reportUnknownVariableType]

        await serve_trio(app, config, shutdown_trigger=stopping.wait)
    else:
        from hypercorn.asyncio import serve as serve_asyncio  # pyright: ignore[reportUnknownVariableType]

        await serve_asyncio(app, config, shutdown_trigger=stopping.wait)


def _watch_children_with_pidfd() -> None:
    """On Python 3.11, asyncio waits for each child process with a thread of its own;
    a pidfd watcher (the default from 3.12 on) needs none. Commands do without asyncio's
    subprocesses where there are pidfds (``app.executor``): this serves the watchdog."""
    if sys.version_info >= (3, 12) or running_backend() != "asyncio":
        return  # uvloop watches its children itself
    import asyncio

    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return  # no pidfd on this kernel: keep the default watcher
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)  # pyright: ignore[reportDeprecated] (3.11 only)


COLLECTOR_THRESHOLDS = (20_000, 20, 20)
"""The cyclic garbage collector's thresholds in a service process (Python's default is
700, 10, 10): a request or a run allocates hundreds of container objects, so at the
default a young collection came every few of them, an older one every few dozen. The
garbage of a cycle waits a little longer (a few MB at most); ``tests.bench.collector_cost``
measures what the collector costs each process."""


def tune_collector() -> None:
    """Set a service process's garbage collector up for serving: ``COLLECTOR_THRESHOLDS``
    now, and ``freeze_start_up`` once the roles are ready."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


MMAP_THRESHOLD = 512 * 1024
"""From this size up, an allocation of a service process is a mapping of its own, given
back when freed (glibc's ``M_MMAP_THRESHOLD``). glibc starts at 128 KiB but raises the
threshold to the size of every mapped block freed, so once a run had big output, its
buffers and its stored document (up to a few MiB each) came from the heap, which
fragments and keeps the peak: a consumer grew +9.1 to +10.6 MiB while a command printed
1 GB of text, +6.8 to +7.5 MiB with the threshold fixed (``tests.bench.holds --parts c``).
It stays above 256 KiB, asyncio's read buffer, so reading a socket costs no extra
system call."""

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def tune_allocator() -> None:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD``, unless the environment sets its
    own (``MALLOC_MMAP_THRESHOLD_``) or the C library is not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not _is_glibc():
        return
    ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False  # not glibc (musl, macOS): no such name


def freeze_start_up(_: str = "") -> None:
    """Move what start-up built (modules, the app and its schema, clients) out of the
    collector's sight: it lives as long as the process, and every full collection
    walked all of it while requests and runs churned (tail latency of ``POST /tasks``:
    ``tests.bench.api_create``)."""
    gc.freeze()


async def run_service(
    settings: Settings,
    *,
    on_ready: Callable[[str], None] | None = None,
    supervised: bool = False,
) -> None:
    """Run the roles in ``settings.roles`` until SIGINT/SIGTERM or, for a consumer
    process of a ``taskq serve`` (``supervised``), until that parent asks it to stop."""
    _check_processes(settings)
    _watch_children_with_pidfd()
    describe_process(settings.roles)
    log.info("event loop: %s", running_backend())
    stopping = anyio.Event()
    roles = settings.roles
    async with AsyncExitStack() as stack:
        watchdog = None
        if "consumer" in roles and not settings.spawns_consumer_processes():
            watchdog = await stack.enter_async_context(watching_commands())
        store = await stack.enter_async_context(
            open_store(
                settings.store_url,
                prefix=settings.key_prefix,
                run_history=settings.run_history,
                event_history=settings.event_history,
                follow_keepalive=settings.follow_keepalive,
                max_followers=settings.max_followers,
            )
        )
        # The api role only pings the broker (for /health): it may start while it is down.
        broker = await stack.enter_async_context(
            open_broker(
                settings.broker_url,
                prefix=settings.key_prefix,
                require_connection=roles != ("api",),
            )
        )
        async with anyio.create_task_group() as process:
            process.start_soon(
                _stop_on_signal, stopping, process.cancel_scope, settings, supervised
            )
            async with anyio.create_task_group() as role_group:
                started: list[str] = []
                for name, body, describe in _role_bodies(
                    settings, store, broker, watchdog, stopping, supervised=supervised
                ):
                    result = await role_group.start(_role, name, body, stopping)
                    if stopping.is_set():
                        break  # a stop during start-up: start nothing more
                    if description := describe(result):
                        started.append(description)
                else:
                    message = "taskq ready: " + ", ".join(started)
                    if supervised:
                        # Not "taskq ready": that line is the parent's, once all are.
                        log.info("consumer process ready: %s", ", ".join(started))
                        report_ready(message)
                    else:
                        log.info(message)
                    if on_ready is not None:
                        on_ready(message)
            process.cancel_scope.cancel()
    log.info("taskq stopped")


def _check_processes(settings: Settings) -> None:
    if settings.spawns_consumer_processes() and MEMORY_URL in (
        settings.store_url,
        settings.broker_url,
    ):
        raise ConfigError(
            f"an in-memory store or broker ({MEMORY_URL}) lives in one process:"
            f" TASKQ_PROCESSES must be 1, got {settings.processes}"
        )


def _role_bodies(
    settings: Settings,
    store: Store,
    broker: Broker,
    watchdog: Watchdog | None,
    stopping: anyio.Event,
    *,
    supervised: bool,
) -> Iterator[tuple[str, Callable[..., Awaitable[None]], Callable[[Any], str]]]:
    """Each role of ``settings.roles``, in start order, then the metrics: its name, its
    body, and how the ready line describes it (from what it reported when started;
    empty: it goes unsaid)."""
    if "api" in settings.roles:
        if not settings.api_tokens:
            log.warning(OPEN_API_WARNING)
        from app.api import create_app  # imported here: see the module's docstring

        app = create_app(
            TaskService(store),
            checks={"store": store.ping, "broker": broker.ping},
            queue_check=partial(pool_stats, store, broker),
            tokens=settings.api_tokens,
            body_seconds=settings.request_timeout,
        )
        serve = partial(serve_http, app, host=settings.host, port=settings.port, stopping=stopping)
        yield "api", serve, lambda port: f"api on http://{settings.host}:{port}"
    if "scheduler" in settings.roles:
        scheduler = Scheduler(
            store,
            broker,
            lease_seconds=settings.lease_seconds,
            lookahead_seconds=settings.lookahead_seconds,
        )
        notifier = _notifier(settings, store)
        body = partial(_dispatch_and_notify, scheduler, notifier, stopping)
        yield "scheduler", body, lambda _: "scheduler"
    if settings.spawns_consumer_processes():
        yield (
            "consumer",
            partial(run_consumer_processes, settings, stopping),
            lambda count: f"{count} consumer processes ({_describe_queues(settings)} each)",
        )
    elif "consumer" in settings.roles:
        consumer = Consumer(
            store,
            broker,
            concurrency=settings.commands_per_process(),
            output_limit=settings.output_limit,
            shutdown_grace=settings.shutdown_grace,
            lease_seconds=settings.lease_seconds,
            watchdog=watchdog,
            held_room=None if settings.lookahead_seconds > 0 else 0,
            queues=settings.queue_concurrency(),
        )
        yield (
            "consumer",
            partial(consumer.run, stopping),
            lambda _: f"consumer ({_describe_queues(settings)})",
        )
    yield from _metrics_role(settings, store, broker, stopping, supervised=supervised)


def _describe_queues(settings: Settings) -> str:
    """How the ready line says what a consumer serves: ``2 at a time`` for the default
    queue alone, else ``queues build (4 at a time), deploy (2 at a time)``."""
    queues = settings.queue_concurrency()
    if list(queues) == [DEFAULT_QUEUE]:
        return f"{queues[DEFAULT_QUEUE]} at a time"
    return "queues " + ", ".join(f"{q} ({n} at a time)" for q, n in queues.items())


def _metrics_role(
    settings: Settings, store: Store, broker: Broker, stopping: anyio.Event, *, supervised: bool
) -> Iterator[tuple[str, Callable[..., Awaitable[None]], Callable[[Any], str]]]:
    """The metrics role, where this process's metrics are scraped: on the API's port,
    on ``TASKQ_METRICS_PORT`` without the api role, or on the parent's (a consumer
    process of ``taskq serve --processes N``); none without either port."""
    body = partial(
        run_metrics, store, broker, stopping, whole_service=not supervised, host=settings.host
    )
    if "api" in settings.roles:
        if settings.metrics_port is not None:
            log.info("TASKQ_METRICS_PORT is not used: the api role serves %s", METRICS_PATH)
        yield "metrics", body, lambda _: ""  # on the api's port, which the line names
    elif supervised:
        yield "metrics", body, lambda _: ""  # through its parent's /metrics
    elif settings.metrics_port is not None:
        yield (
            "metrics",
            partial(body, port=settings.metrics_port),
            lambda port: f"metrics on http://{settings.host}:{port}{METRICS_PATH}",
        )
    else:
        log.info("no metrics endpoint: without the api role, TASKQ_METRICS_PORT sets one")


async def run_metrics(
    store: Store,
    broker: Broker,
    stopping: anyio.Event,
    *,
    whole_service: bool,
    host: str,
    port: int | None = None,
    task_status: StartedStatus[int | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Sample the gauges (``app.metrics.sample``) and, given a ``port``, serve
    ``/metrics`` there until ``stopping`` is set; reports the bound port."""
    async with anyio.create_task_group() as metrics:
        metrics.start_soon(cancel_when_set, stopping, metrics.cancel_scope)
        await metrics.start(partial(sample, store, broker, whole_service=whole_service))
        bound = None
        if port is not None:
            from app.metrics_http import metrics_app  # imported here: see the module's docstring

            serve = partial(serve_http, metrics_app(), host=host, port=port, stopping=stopping)
            bound = await metrics.start(serve)
        task_status.started(bound)


async def _dispatch_and_notify(
    scheduler: Scheduler,
    notifier: Notifier,
    stopping: anyio.Event,
    *,
    task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The scheduler role: its scheduler, and its notifier (``app.notifier``)."""
    async with anyio.create_task_group() as role:
        for part in (scheduler.run, notifier.run):
            await role.start(_part, part, stopping)
            if stopping.is_set():
                break  # a stop during start-up: start nothing more
        task_status.started()


async def _part(
    body: Callable[..., Awaitable[None]],
    stopping: anyio.Event,
    *,
    task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run one part of a role; one stopped before it was ready counts as started (the
    role is stopping anyway)."""
    report = _StartReport(task_status)
    await body(stopping, task_status=report)
    if not report.reported:
        task_status.started()


def _notifier(settings: Settings, store: Store) -> Notifier:
    """The scheduler role's notifier (``app.notifier``)."""
    if not settings.webhook_secret:
        log.warning(NO_SECRET_WARNING)
    return Notifier(
        store,
        secret=settings.webhook_secret,
        public_url=settings.run_links_base(),
        lease_seconds=settings.lease_seconds,
        timeout=settings.notify_timeout,
        max_attempts=settings.notify_attempts,
        first_delay=settings.notify_backoff,
        concurrency=settings.notify_concurrency,
    )


async def run_consumer_processes(
    settings: Settings,
    stopping: anyio.Event,
    *,
    task_status: StartedStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The consumer role as ``settings.consumer_processes()``, each a role of its own
    (``consumer-1``...), started together; reports their number once all consume."""
    stop_within = settings.shutdown_grace + 2 * STOP_MARGIN_SECONDS
    async with anyio.create_task_group() as processes:
        async with anyio.create_task_group() as starting:
            for number in range(1, settings.consumer_processes() + 1):
                body = partial(run_consumer_process, settings, stopping, stop_within=stop_within)
                starting.start_soon(
                    partial(processes.start, _role, f"consumer-{number}", body, stopping)
                )
        task_status.started(settings.consumer_processes())


def root_cause(error: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: what a person needs to read."""
    nested: Sequence[BaseException] = getattr(error, "exceptions", ())
    return root_cause(nested[0]) if nested else error


class _StartReport(StartedStatus[Any]):
    """Passes a role's "started" on, remembering whether it came."""

    def __init__(self, status: StartedStatus[Any]) -> None:
        self._status = status
        self.reported = False

    def started(self, value: Any = None) -> None:
        self.reported = True
        self._status.started(value)


async def _role(
    name: str,
    body: Callable[..., Awaitable[None]],
    stopping: anyio.Event,
    *,
    task_status: StartedStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    report = _StartReport(task_status)
    try:
        await body(task_status=report)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, RoleCrashed):
            raise  # a part of this role (a consumer process) crashed, and said so
        log.critical("role %s crashed: %s: %s", name, type(cause).__name__, cause, exc_info=exc)
        raise RoleCrashed(f"role {name} crashed: {type(cause).__name__}: {cause}") from exc
    if not report.reported and stopping.is_set():
        # Stopped before it was ready: an orderly stop, not a failure to start.
        task_status.started(None)
    log.info("role %s stopped", name)


async def _stop_on_signal(
    stopping: anyio.Event, process: anyio.CancelScope, settings: Settings, supervised: bool
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # A signal that came while the process started was held for now (app.startup).
        if (early := stop_requested()) is not None:
            log.info("%s received while starting: stopping", early.name)
            signalled = 1
        else:
            signalled = await _first_stop_request(signals, supervised)
        stopping.set()
        with anyio.move_on_after(settings.shutdown_grace + STOP_MARGIN_SECONDS) as deadline:
            # The second signal stops now. The parent's request to stop does not count:
            # the signal a terminal or an orchestrator sends to every process of the
            # service may reach a consumer process just after it.
            async for signum in signals:
                signalled += 1
                if signalled >= 2:
                    log.warning("second %s: stopping now", signal.Signals(signum).name)
                    break
                log.info("%s received: stopping already", signal.Signals(signum).name)
        if deadline.cancelled_caught:
            log.warning("orderly stop took too long: stopping now")
        process.cancel()


async def _first_stop_request(signals: AsyncIterator[signal.Signals], supervised: bool) -> int:
    """Wait for SIGINT/SIGTERM or, in a consumer process (``supervised``), for its
    parent's request to stop; the number of signals that was (1 or 0)."""
    received: list[signal.Signals] = []

    async def first_signal() -> None:
        async for signum in signals:
            log.info("%s received: stopping", signal.Signals(signum).name)
            received.append(signum)
            break
        waiting.cancel_scope.cancel()

    async def parent_asks_to_stop() -> None:
        await parent_gone()
        log.info("the parent taskq serve asked this consumer process to stop, or died")
        waiting.cancel_scope.cancel()

    async with anyio.create_task_group() as waiting:
        waiting.start_soon(first_signal)
        if supervised:
            waiting.start_soon(parent_asks_to_stop)
    return len(received)

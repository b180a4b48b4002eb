"""Prometheus metrics: what taskq counts, and the text a scrape of ``/metrics`` reads.

Each thing is counted once, where it happens: runs started and ended when their
transition is committed (``count_committed``, whichever role commits it), the
scheduler's claims, dispatches and dead letters in the scheduler, running commands and
free slots in the consumer, requests in the API (``app.metrics_http``). What no role
does as it goes (the queue's depth, the due entries waiting, whether the store and the
broker answer) is sampled every few seconds (``sample``), so a scrape never waits for
a dependency that is down.

The consumer processes of a ``taskq serve --processes N`` write their values to the
directory of ``app.metrics_directory``, and their parent's scrape adds them up: counters
and histograms are summed, including those of processes that exited; gauges that add
up (running commands, free slots) are summed over the live processes; gauges that
describe one process (store and broker up, ``taskq_info``) keep a ``pid`` label.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version

import anyio
from anyio.abc import TaskStatus as StartedStatus
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import (
    MultiProcessCollector,
    mark_process_dead,  # pyright: ignore[reportUnknownVariableType]
)

from app.domain import RunOutcome, Transition, ended_runs, run_outcome, started_runs
from app.metrics_directory import MULTIPROCESS_VARIABLE
from app.outages import probe
from app.pools import pool_stats
from app.ports import Broker, Store

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
METRICS_PATH = "/metrics"
SAMPLE_SECONDS = 5.0
"""How often the sampled gauges are refreshed."""
PROBE_SECONDS = 1.0
"""How long one sample waits for the store or the broker at most."""

# Commands run from milliseconds to hours; lateness is milliseconds when all is well,
# and seconds to hours when the scheduler or the consumers cannot keep up.
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400)
_LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

RUNS_STARTED = Counter("taskq_runs_started", "Runs a consumer started.")
RUNS_FINISHED = Counter(
    "taskq_runs_finished",
    "Runs that ended, by outcome (lost: recovered after its worker stopped renewing its"
    " lease; not_started: never ran, e.g. dead-lettered; skipped: a fire not run).",
    ["outcome"],
)
RUN_DURATION = Histogram(
    "taskq_run_duration_seconds", "How long finished commands ran.", buckets=_DURATION_BUCKETS
)
RUN_LATENESS = Histogram(
    "taskq_run_lateness_seconds",
    "How long after it was due a run started (due: its not_before, else when it was queued).",
    buckets=_LATENESS_BUCKETS,
)
CLAIMS = Counter("taskq_scheduler_claims", "Entries of scheduled_tasks the scheduler claimed.")
DISPATCHES = Counter(
    "taskq_scheduler_dispatches",
    "Dispatch messages the scheduler published and RabbitMQ confirmed.",
)
DEAD_LETTERS = Counter(
    "taskq_scheduler_dead_letters", "Dead-lettered dispatch messages the scheduler handled."
)
DUE_ENTRIES = Gauge(
    "taskq_scheduler_due_entries",
    "Entries of scheduled_tasks due now and not claimed (sampled).",
    multiprocess_mode="livemostrecent",
)
RUNNING_COMMANDS = Gauge(
    "taskq_consumer_running_commands", "Commands running now.", multiprocess_mode="livesum"
)
FREE_SLOTS = Gauge(
    "taskq_consumer_free_slots",
    "Commands the consumers could start now (their concurrency, less the slots taken).",
    multiprocess_mode="livesum",
)
QUEUE_MESSAGES = Gauge(
    "taskq_broker_queue_messages",
    "Messages ready in a taskq queue, not yet delivered, by queue (sampled).",
    ["queue"],
    multiprocess_mode="livemostrecent",
)
HTTP_REQUESTS = Counter(
    "taskq_http_requests",
    "API requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "taskq_http_request_duration_seconds",
    "Time from a request's arrival to its response's start (a stream is timed to its"
    " start, not over its whole life), by method and route template.",
    ["method", "route"],
    buckets=_HTTP_BUCKETS,
)
STORE_UP = Gauge(
    "taskq_store_up",
    "1 while this process reaches the store (Redis), else 0 (sampled).",
    multiprocess_mode="liveall",
)
BROKER_UP = Gauge(
    "taskq_broker_up",
    "1 while this process reaches the broker (RabbitMQ), else 0 (sampled).",
    multiprocess_mode="liveall",
)
INFO = Gauge(
    "taskq_info",
    "1, labelled with this process's taskq version and roles.",
    ["version", "roles"],
    multiprocess_mode="liveall",
)
# Every outcome is a series from the start; a run's end does not look its series up.
_FINISHED = {outcome: RUNS_FINISHED.labels(outcome.value) for outcome in RunOutcome}


def count_committed(transition: Transition) -> None:
    """Count the runs ``transition`` started and ended. Call it once the transition is
    committed, and only then: a change the store did not apply changed nothing."""
    for run in started_runs(transition):
        RUNS_STARTED.inc()
        if run.started_at is not None:
            due = run.not_before or run.queued_at
            # Clocks of different machines stamp the two times: never below 0.
            RUN_LATENESS.observe(max(0.0, (run.started_at - due).total_seconds()))
    for run in ended_runs(transition):
        if (outcome := run_outcome(run)) is not None:
            _FINISHED[outcome].inc()
        if run.duration is not None:
            RUN_DURATION.observe(run.duration)


def describe_process(roles: Sequence[str]) -> None:
    """Say which taskq this process is (``taskq_info``)."""
    INFO.labels(version("taskq"), ",".join(roles)).set(1)


def exposition() -> bytes:
    """The metrics in Prometheus's text format: this process's, or with the multiprocess
    directory, every process's of the service."""
    if directory := os.environ.get(MULTIPROCESS_VARIABLE):
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def process_exited(pid: int) -> None:
    """A consumer process of this service exited: its live gauges no longer count."""
    if directory := os.environ.get(MULTIPROCESS_VARIABLE):
        mark_process_dead(pid, path=directory)


async def sample(
    store: Store,
    broker: Broker,
    *,
    whole_service: bool,
    task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Refresh the sampled gauges every ``SAMPLE_SECONDS`` until cancelled: store and
    broker up, and with ``whole_service`` (not in a consumer process, whose parent
    samples them) the queue's depth and the due entries waiting. Reports started once
    they hold a first sample (within ``PROBE_SECONDS``)."""
    await _sample_once(store, broker, whole_service=whole_service)
    task_status.started()
    while True:
        await anyio.sleep(SAMPLE_SECONDS)
        await _sample_once(store, broker, whole_service=whole_service)


async def _sample_once(store: Store, broker: Broker, *, whole_service: bool) -> None:
    async def store_sample() -> None:
        if whole_service:
            DUE_ENTRIES.set(await store.count_due(now=time.time()))
        else:
            await store.ping()

    async def broker_sample() -> None:
        if not whole_service:
            await broker.ping()
            return
        for stats in await pool_stats(store, broker):
            QUEUE_MESSAGES.labels(queue=stats.queue).set(stats.depth)

    async def probed(check: Callable[[], Awaitable[None]], up: Gauge) -> None:
        up.set(await probe(check, within=PROBE_SECONDS) is None)

    async with anyio.create_task_group() as probes:
        probes.start_soon(probed, store_sample, STORE_UP)
        probes.start_soon(probed, broker_sample, BROKER_UP)

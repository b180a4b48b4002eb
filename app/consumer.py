"""The consumer role: takes dispatch messages, runs the commands, records the runs.

A delivery is acknowledged as soon as the run is recorded as ``running`` in the
store, not when the command ends: RabbitMQ's consumer timeout then never limits how
long a command may run, and the store (not the broker) owns the run from there on.
Redelivered or duplicate messages for a run that is no longer queued are
acknowledged and skipped, which makes execution at-least-once without double runs
of the same queued run.

Concurrent runs read and commit through one ``Coalescer``: the reads of dispatched
runs, the starts and the results that wait while a round trip is in flight go together
in the next one, instead of three round trips per run.

A dispatch sent ahead of its run's due time (``not_before``, see ``app.scheduler``) is
held until this consumer's clock reaches that time, then claimed and started like any
other. Held deliveries take no run slot, but they do take AMQP prefetch: the prefetch is
``concurrency`` for runs plus room for held deliveries (``held_room``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from datetime import UTC, datetime, timedelta
from typing import cast

import anyio
from anyio.abc import TaskGroup
from anyio.abc import TaskStatus as StartedStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from app.chains import involves_chain
from app.coalescing import Coalescer, Pending
from app.domain import (
    CANCELLED_REASON,
    ENTROPY,
    DomainError,
    Entropy,
    NotDueYet,
    Outcome,
    Run,
    RunOutcome,
    RunStatus,
    Task,
    Transition,
    cancel_running,
    finish_run,
    requeue_run,
    run_outcome,
    start_run,
    utcnow,
    worker_name,
)
from app.executor import CappedOutput, inherited_environment, run_command
from app.live_output import OutputRelay
from app.logs import about, handling
from app.metrics import FREE_SLOTS, RUNNING_COMMANDS, count_committed
from app.outages import Backoff, settle, until_available
from app.ports import DEFAULT_QUEUE, Broker, Delivery, Store, StoreUnavailable, TaskChange
from app.stopping import cancel_after, cancel_when_set
from app.transactions import transact
from app.watchdog import Watchdog

log = logging.getLogger(__name__)

_TaskAndRun = tuple[Task | None, Run | None]


class EarlyRead:
    """A read of a dispatched run asked for before its answer is needed."""

    __slots__ = ("_batches", "_pending")

    def __init__(
        self,
        batches: Coalescer[tuple[str, str] | TaskChange, _TaskAndRun | bool],
        pending: Pending[tuple[str, str] | TaskChange, _TaskAndRun | bool],
    ) -> None:
        self._batches = batches
        self._pending = pending

    async def answer(self) -> _TaskAndRun:
        return cast(_TaskAndRun, await self._batches.answer(self._pending))


class StoreCalls:
    """A consumer's reads of dispatched runs and its commits, sent to the store together
    (``TaskStore.read_and_commit_each``): whatever waits while a round trip is in flight
    goes in the next one, reads and commits alike. ``serve`` must run while they are
    used."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._batches = Coalescer[tuple[str, str] | TaskChange, _TaskAndRun | bool](
            self._round_trip
        )

    async def serve(self, *, task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self._batches.serve(task_status=task_status)

    async def read(self, pair: tuple[str, str]) -> _TaskAndRun:
        """The task and the run of a (task id, run id) pair."""
        return cast(_TaskAndRun, await self._batches.submit(pair))

    def read_soon(self, pair: tuple[str, str]) -> EarlyRead:
        """Ask for the task and the run of ``pair`` now, and for the answer later."""
        return EarlyRead(self._batches, self._batches.request(pair))

    async def commit(self, change: TaskChange) -> bool:
        """Whether ``change`` was applied (``commit_each``)."""
        return cast(bool, await self._batches.submit(change))

    async def _round_trip(
        self, requests: Sequence[tuple[str, str] | TaskChange]
    ) -> list[_TaskAndRun | bool]:
        pairs = [r for r in requests if not isinstance(r, TaskChange)]
        changes = [r for r in requests if isinstance(r, TaskChange)]
        reads, applied = await self._store.read_and_commit_each(pairs, changes)
        reads_left, applied_left = iter(reads), iter(applied)
        return [
            next(applied_left) if isinstance(r, TaskChange) else next(reads_left) for r in requests
        ]


SHUTDOWN_BOOKKEEPING_SECONDS = 10.0
EARLY_CANCEL_SECONDS = 60.0
RENEW_RETRY_SECONDS = 0.5
HELD_ROOM_PER_SLOT = 2
"""Prefetch room for deliveries held until their due time, per run slot (the default
``held_room``). Deliveries come in queue order: a message due now gets through as long
as fewer held ones than the whole prefetch are ahead of it; behind more, it waits until
held ones start (at most the scheduler's look-ahead)."""


class RunSlots:
    """The commands a consumer may run at once, as slots taken and given back; the free
    ones are counted (``taskq_consumer_free_slots``) while the consumer runs."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._free = anyio.Semaphore(count)

    @contextmanager
    def counted(self) -> Generator[RunSlots]:
        """These slots, counted as free until they are taken, for the context's length."""
        FREE_SLOTS.inc(self._count)
        try:
            yield self
        finally:
            FREE_SLOTS.dec(self._free.value)

    async def take(self) -> None:
        await self._free.acquire()
        FREE_SLOTS.dec()

    def give_back(self) -> None:
        self._free.release()
        FREE_SLOTS.inc()


class RunningCommands:
    """The commands this consumer runs, by task, and the cancel notices they answer to.

    A notice can come before its run is registered here (the start was recorded but the
    command not started yet): it is remembered for ``EARLY_CANCEL_SECONDS`` and stops
    the command as soon as it is registered.
    """

    def __init__(self) -> None:
        self._running: dict[str, tuple[str, anyio.CancelScope]] = {}
        self._early_cancels: dict[str, float] = {}  # run id -> when the notice came

    def task_ids(self) -> list[str]:
        return sorted(self._running)

    @contextmanager
    def register(self, task: Task, run: Run) -> Generator[anyio.CancelScope]:
        """The scope to run ``run``'s command in: a cancel notice for it cancels it."""
        stop = anyio.CancelScope()
        self._running[task.id] = (run.run_id, stop)
        if task.cancel_requested or self._early_cancels.pop(run.run_id, None) is not None:
            stop.cancel()
        RUNNING_COMMANDS.inc()
        try:
            yield stop
        finally:
            RUNNING_COMMANDS.dec()
            del self._running[task.id]

    def stop(self, run_id: str) -> None:
        """Stop the command of ``run_id``, now or as soon as it is registered."""
        for task_id, (running_id, scope) in self._running.items():
            if running_id == run_id:
                log.info("stopping %s/%s: cancelled", task_id, run_id, extra=about(task_id, run_id))
                scope.cancel()
                return
        now = time.monotonic()
        self._early_cancels = {
            r: at for r, at in self._early_cancels.items() if now - at < EARLY_CANCEL_SECONDS
        }
        self._early_cancels[run_id] = now


def _log_ended(run: Run, outcome: Outcome) -> None:
    """A line for a run that just ended: at INFO when it did not complete (failed, timed
    out, could not start, ...), else at DEBUG (a busy consumer completes thousands)."""
    ended = run_outcome(run)
    level = logging.DEBUG if ended == RunOutcome.COMPLETED else logging.INFO
    if log.isEnabledFor(level):
        log.log(
            level,
            "run %s/%s %s after %.3f s%s%s",
            run.task_id,
            run.run_id,
            ended,
            outcome.duration,
            "" if outcome.exit_code is None else f", exit code {outcome.exit_code}",
            "" if run.error is None else f": {run.error}",
        )


class Consumer:
    """Runs dispatched tasks from the queues it serves, at most ``concurrency`` at a time
    from each (or the queue's own number, ``queues``)."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        concurrency: int,
        output_limit: int,
        shutdown_grace: float,
        lease_seconds: float,
        worker: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        entropy: Entropy = ENTROPY,
        watchdog: Watchdog | None = None,
        held_room: int | None = None,
        queues: Mapping[str, int] | None = None,
    ) -> None:
        """``held_room`` is the prefetch beyond a queue's concurrency for deliveries held
        until their due time (default ``HELD_ROOM_PER_SLOT`` per slot). With no scheduler
        looking ahead, 0: a busy consumer then reserves no message another could run.
        ``queues``: the taskq queues served, each with the commands run from it at once
        (default: the default queue, with ``concurrency``)."""
        self._store = store
        self._broker = broker
        self._queues = dict(queues or {DEFAULT_QUEUE: concurrency})
        self._held_room = held_room
        self._output_limit = output_limit
        self._shutdown_grace = shutdown_grace
        self._lease = timedelta(seconds=lease_seconds)
        self._commands = RunningCommands()
        self._worker = worker or worker_name()
        self._clock = clock
        self._entropy = entropy
        self._watchdog = watchdog
        self._environment = inherited_environment()
        self._relay = OutputRelay(store, keep=output_limit)
        # Concurrent runs read and commit together: one round trip per batch, not per run.
        self._store_calls = StoreCalls(store)

    async def run(
        self, stopping: anyio.Event, *, task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume until ``stopping`` is set, then let running commands finish for the
        grace period and give back the ones still running after it."""
        await self._note_queues()
        with ExitStack() as counting:
            slots = {
                q: counting.enter_context(RunSlots(c).counted()) for q, c in self._queues.items()
            }
            await self._consume(stopping, slots, task_status)

    async def _consume(
        self, stopping: anyio.Event, slots: Mapping[str, RunSlots], task_status: StartedStatus[None]
    ) -> None:
        async with anyio.create_task_group() as timers:
            async with anyio.create_task_group() as runs:
                with anyio.CancelScope() as intake:
                    timers.start_soon(cancel_when_set, stopping, intake)
                    timers.start_soon(self._renew_leases)
                    timers.start_soon(self._relay.forward)
                    timers.start_soon(self._store_calls.serve)
                    await timers.start(self._watch_cancels)
                    async with anyio.create_task_group() as intakes:
                        for queue, concurrency in self._queues.items():
                            await intakes.start(self._take, queue, concurrency, slots[queue], runs)
                        task_status.started()
                # Unstarted deliveries went back to the queue; running commands get
                # the grace period, then are cancelled and their tasks requeued.
                log.info("consumer stopped taking messages; waiting for running commands")
                timers.start_soon(cancel_after, self._shutdown_grace, runs.cancel_scope)
            timers.cancel_scope.cancel()

    async def _take(
        self,
        queue: str,
        concurrency: int,
        slots: RunSlots,
        runs: TaskGroup,
        *,
        task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Take deliveries from ``queue`` and run them, ``concurrency`` at a time, until
        cancelled (the intake stops)."""
        held_room = HELD_ROOM_PER_SLOT * concurrency if self._held_room is None else self._held_room
        async with (
            self._broker.consume(prefetch=concurrency + held_room, queue=queue) as deliveries,
            anyio.create_task_group() as held,  # stops with the intake
        ):
            # Deliveries due now wait here for a run slot, in the order they came, their
            # runs read meanwhile: the reads of deliveries that came together go to the
            # store together, and a freed slot has only the start left to commit.
            waiting, in_turn = anyio.create_memory_object_stream[tuple[Delivery, EarlyRead | None]](
                math.inf
            )
            held.start_soon(self._start_in_turn, in_turn, slots, runs)
            task_status.started()
            with waiting:
                async for delivery in deliveries:
                    if (due := self._not_before(delivery)) is not None:
                        held.start_soon(self._hold, delivery, due, slots, runs)
                        continue
                    waiting.send_nowait((delivery, self._read_soon(delivery)))
        raise RuntimeError(f"the broker stopped delivering messages from queue {queue!r}")

    async def _start_in_turn(
        self,
        in_turn: MemoryObjectReceiveStream[tuple[Delivery, EarlyRead | None]],
        slots: RunSlots,
        runs: TaskGroup,
    ) -> None:
        """Start the deliveries due now as run slots free up, in the order they came."""
        with in_turn:
            async for delivery, early in in_turn:
                await slots.take()
                runs.start_soon(self._handle, delivery, slots, early)

    async def _note_queues(self) -> None:
        """Tell the store which queues are served, for ``/health`` (not worth waiting for)."""
        try:
            await self._store.note_queues(sorted(self._queues))
        except StoreUnavailable as exc:
            log.warning("cannot note the queues served: %s", exc)

    def _not_before(self, delivery: Delivery) -> datetime | None:
        """When a delivery's run is due, if that is still to come by this consumer's clock."""
        dispatch = delivery.dispatch
        if dispatch is None or dispatch.not_before is None:
            return None
        due = datetime.fromtimestamp(dispatch.not_before, UTC)
        return due if due > self._clock() else None

    async def _hold(
        self, delivery: Delivery, due: datetime, slots: RunSlots, runs: TaskGroup
    ) -> None:
        """Hold a delivery, without a run slot, until its run is due; then handle it as
        if it came then. Its task and run are read while it waits, so that at the due
        time only the start is left to commit (a task changed meanwhile fails that
        commit's version check and is read again). Stopping the intake cancels this: the
        delivery goes back to the queue unsettled."""
        early = self._read_soon(delivery)
        await self._wait_until(due)
        await slots.take()
        runs.start_soon(self._handle, delivery, slots, early)

    def _read_soon(self, delivery: Delivery) -> EarlyRead | None:
        """Ask for the delivered run and its task now, to have them when it starts
        (``None``: the body is not a dispatch, there is nothing to read)."""
        dispatch = delivery.dispatch
        if dispatch is None:
            return None
        return self._store_calls.read_soon((dispatch.task_id, dispatch.run_id))

    async def _wait_until(self, moment: datetime) -> None:
        """Sleep until this consumer's clock (the one that stamps ``started_at``) reads
        ``moment``: between machines whose clocks differ, the consumer's decides."""
        while True:
            left = (moment - self._clock()).total_seconds()
            if left <= 0:
                return
            await anyio.sleep(left)  # the wall clock may lag the sleep's: look again

    async def _handle(
        self, delivery: Delivery, slot: RunSlots, early: EarlyRead | None = None
    ) -> None:
        dispatch = delivery.dispatch
        try:
            with nullcontext() if dispatch is None else handling(dispatch.task_id, dispatch.run_id):
                started = await self._claim(delivery, early)
                if started is not None:
                    task, run = started
                    outcome, cancelled = await self._execute(task, run)
                    await self._record(task, run, outcome, cancelled=cancelled)
        finally:
            slot.give_back()

    async def _claim(
        self, delivery: Delivery, early: EarlyRead | None = None
    ) -> tuple[Task, Run] | None:
        """Record the delivered run as started by this worker and acknowledge the delivery;
        ``None`` (delivery settled) when there is nothing to run. ``early`` is the read of
        the task and run asked for when the delivery came (a run's status only moves on
        from ``queued``, so a run read as not queued is not queued now either; a task
        changed since fails the start's version check and is read again; a read the
        store's outage failed is made again here)."""
        dispatch = delivery.dispatch
        if dispatch is None:
            log.error("dead-lettering a message whose body is not a dispatch")
            await settle(delivery.dead_letter)
            return None
        # While the store is out of reach the delivery stays unsettled here, and the
        # prefetch limit stops more from arriving.
        pair = (dispatch.task_id, dispatch.run_id)
        read = None
        if early is not None:
            with suppress(StoreUnavailable):  # read again below, waiting out the outage
                read = await early.answer()
        if read is None:
            read = await until_available(
                lambda: self._store_calls.read(pair), "read a dispatched run"
            )
        task, run = read
        started = None
        if task is None or run is None or run.status != RunStatus.QUEUED:
            log.info("skipping %s/%s: not a queued run", dispatch.task_id, dispatch.run_id)
        else:
            try:
                started = await self._start(task, run)
            except DomainError as exc:
                log.info("skipping %s/%s: %s", dispatch.task_id, dispatch.run_id, exc)
        await settle(delivery.ack)
        return started

    async def _execute(self, task: Task, run: Run) -> tuple[Outcome, bool]:
        """Run the task's command, relaying its output live; return what it produced and
        whether a cancel notice stopped it. Cancelled (shutdown), it gives the run back
        to the queue first."""
        started = time.monotonic()
        live = self._relay.open(run.run_id)
        output = CappedOutput(self._output_limit, listener=live.append)
        outcome: Outcome | None = None
        try:
            with self._commands.register(task, run) as stop, stop:
                outcome = await run_command(
                    ["/bin/sh", "-c", task.command]
                    if task.command is not None
                    else task.args or [],
                    env=self._environment | task.env,
                    cwd=task.cwd,
                    time_limit=task.timeout,
                    output=output,
                    watchdog=self._watchdog,
                )
        except anyio.get_cancelled_exc_class():
            with anyio.move_on_after(SHUTDOWN_BOOKKEEPING_SECONDS, shield=True):
                await until_available(lambda: self._give_back(run), "requeue a run")
            raise
        finally:
            self._relay.close(live)
        await live.finish(within=SHUTDOWN_BOOKKEEPING_SECONDS)
        if outcome is None:  # stopped by a cancel notice
            return output.outcome(started=started, error=CANCELLED_REASON), True
        return outcome, False

    async def _record(self, task: Task, run: Run, outcome: Outcome, *, cancelled: bool) -> None:
        """Record how the run ended. The result matters more than the wait: without it
        the lease would run out and the command would run again."""
        now = self._clock

        def plan(current: Task) -> Transition:
            if cancelled:
                return cancel_running(current, run, outcome, now(), entropy=self._entropy)
            return finish_run(current, run, outcome, now(), entropy=self._entropy)

        try:
            recorded = await self._commit_together(plan, task, "record a result")
        except DomainError as exc:
            log.warning("result of %s/%s not recorded: %s", run.task_id, run.run_id, exc)
            return
        _log_ended(recorded.run, outcome)

    async def _watch_cancels(
        self, *, task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Stop running commands whose task was cancelled, whichever process asked."""
        backoff = Backoff()
        while True:
            try:
                async with self._store.cancel_notices() as notices:
                    task_status.started()
                    task_status = anyio.TASK_STATUS_IGNORED
                    backoff.reset()
                    async for run_id in notices:
                        self._commands.stop(run_id)
            except StoreUnavailable as exc:
                await backoff.wait("cannot watch for cancels", exc)

    async def _renew_leases(self) -> None:
        """Keep the leases of the running runs ahead of now, so no scheduler takes them
        for lost; a worker that dies stops renewing and its runs are recovered."""
        pause = self._lease.total_seconds() / 3
        while True:
            await anyio.sleep(pause)
            pause = self._lease.total_seconds() / 3
            if running := self._commands.task_ids():
                until = (self._clock() + self._lease).timestamp()
                try:
                    await self._store.extend_leases(running, until=until)
                except StoreUnavailable as exc:
                    # Renew as soon as the store is back, before any lease runs out.
                    log.warning("cannot renew run leases: %s", exc)
                    pause = min(pause, RENEW_RETRY_SECONDS)

    async def _start(self, task: Task, run: Run) -> tuple[Task, Run]:
        def plan(current: Task) -> Transition:
            now = self._clock()
            return start_run(current, run, self._worker, now, lease_until=now + self._lease)

        while True:
            try:
                started = await self._commit_together(plan, task, "record a start")
            except NotDueYet as early:
                # Its message said it was due (an old one carries no time, or this
                # clock stepped back): it starts when it is due, never before.
                await self._wait_until(early.not_before)
                continue
            return started.task, started.run

    async def _commit_together(
        self, plan: Callable[[Task], Transition], known: Task, what: str
    ) -> Transition:
        """Plan from ``known`` and commit with the other runs' commits; if the task
        changed since ``known`` was read, read it again and commit alone (``transact``).

        Raises the ``DomainError`` of a plan the task does not allow; waits out outages.
        """
        planned = plan(known)
        if involves_chain(planned):  # reads the chain's tasks: committed on its own
            return await until_available(lambda: transact(self._store, known.id, plan), what)
        change = TaskChange.of(planned)
        # Sending the very same change again after an outage is safe: a store that
        # applied it (and lost the answer) reports it applied, not a conflict.
        if await until_available(lambda: self._store_calls.commit(change), what):
            count_committed(planned)
            return planned
        return await until_available(lambda: transact(self._store, known.id, plan), what)

    async def _give_back(self, run: Run) -> None:
        """Close a run this worker could not finish and queue the task again."""

        def plan(task: Task) -> Transition:
            reason = "worker shut down"
            return requeue_run(task, run, reason, self._clock(), entropy=self._entropy)

        try:
            await transact(self._store, run.task_id, plan)
        except DomainError as exc:
            log.warning("could not requeue %s/%s: %s", run.task_id, run.run_id, exc)
        else:
            log.info("requeued %s after shutdown interrupted run %s", run.task_id, run.run_id)

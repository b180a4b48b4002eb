"""The scheduler role: turns due entries of ``scheduled_tasks`` into dispatch messages.

It sleeps until the earliest due time (woken early when an earlier one is added,
in any process), leases a batch of due entries atomically, moves each task to
``pending`` with a queued run, publishes the batch with publisher confirms and only
then removes the entries. A scheduler that dies anywhere in between leaves leased
entries that become due again when the lease ends, so nothing due is lost; the
queued run is reused, so a due time still produces one run.

It also consumes the dead-letter queue: a dispatch the broker gave up on (it went back
to the queue more than ``DELIVERY_LIMIT`` times without its run starting) is sent again
a lease period later, and after ``DEAD_LETTER_LIMIT`` times its run fails, so the task
retries or fails instead of waiting in ``pending`` for ever.

With a look-ahead (``TASKQ_LOOKAHEAD_SECONDS``) it wakes that long before a due time and
fires what is due within it ahead of time: the run and its message carry the due time
(``not_before``), and the consumer that receives it holds it and starts it at that
instant, so the claim, commit, publish and delivery are paid before the due time rather
than after it. Only fires are taken ahead: a run lease claimed inside the look-ahead is
put back at its time, because a lease that has not run out is no lost run.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio
from anyio.abc import TaskStatus as StartedStatus

from app.chains import involves_chain
from app.domain import (
    DEAD_LETTER_LIMIT,
    ENTROPY,
    DomainError,
    Entropy,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    Transition,
    UnreadableRun,
    UnreadableTask,
    dead_lettered,
    extend_lease,
    fire_schedule,
    lose_run,
    lose_unreadable_run,
    restore_entry,
    set_aside,
    timestamp,
    utcnow,
    worker_name,
)
from app.logs import about
from app.metrics import CLAIMS, DEAD_LETTERS, DISPATCHES, count_committed
from app.outages import OUTAGES, Backoff, settle, until_available
from app.ports import Broker, Claim, Delivery, Dispatch, TaskChange, TaskStore
from app.stopping import cancel_when_set
from app.transactions import commit_alone, transact

log = logging.getLogger(__name__)

# Re-read the schedule at least this often even without a wake-up, in case a
# notification was lost with a dropped connection.
RESYNC_SECONDS = 5.0
MAX_REPLANS = 20
DEAD_LETTER_PREFETCH = 10


@dataclass(frozen=True, slots=True)
class _Plan:
    """What dispatching one claimed task takes: a transition to commit first, and/or a
    message. ``keep_claim`` leaves the entry leased (planned again when the lease ends)."""

    change: Transition | None = None
    dispatch: Dispatch | None = None
    keep_claim: bool = False
    lease_ahead: bool = False
    """A run lease claimed within the look-ahead and put back: until it ends, wait for
    entries without looking ahead (it would be claimed again at once)."""


def _dispatch_of(task: Task) -> Dispatch:
    """The message that dispatches the task's queued run (from its ``not_before``)."""
    assert task.active_run is not None
    run = task.active_run
    not_before = None if run.not_before is None else timestamp(run.not_before)
    return Dispatch(
        task_id=task.id,
        run_id=run.run_id,
        attempt=run.attempt,
        not_before=not_before,
        queue=task.queue,
    )


def plan_dispatch(
    task: Task,
    now: datetime,
    running: Run | UnreadableRun | None = None,
    *,
    fire_until: datetime | None = None,
    entry_due: datetime | None = None,
    extend_lease_to: datetime | None = None,
    entropy: Entropy = ENTROPY,
) -> _Plan:
    """Decide what a claimed entry of ``scheduled_tasks`` means for its task now.

    ``running`` is the task's active run when the task is running (or why its document
    cannot be read: recovered as lost all the same when its lease ran out). A scheduled time up
    to ``fire_until`` (default ``now``) is fired, ahead of its time if need be (the run
    waits for it). ``entry_due`` is when the claimed entry was due: a run lease claimed
    before it ran out is put back. With ``extend_lease_to``, an expired run lease is
    extended rather than taken for lost.
    """
    if task.status == TaskStatus.PENDING and task.active_run is not None:
        # Queued by "execute", a retry (its message carries its time), or by a scheduler
        # that died before its publish was confirmed.
        return _Plan(dispatch=_dispatch_of(task))
    if task.status == TaskStatus.RUNNING and running is not None:
        if entry_due is not None and entry_due > now:
            # Claimed within the look-ahead: the lease has not run out.
            return _Plan(change=extend_lease(task, now, entry_due), lease_ahead=True)
        # A running task's entry is its run's lease: due means nobody renewed it ...
        if extend_lease_to is None:
            return _recover_lost_run(task, running, now, entropy)
        # ... unless the store was just out of reach for everyone, consumers included.
        return _Plan(change=extend_lease(task, now, extend_lease_to))
    if task.active_run is not None or task.scheduled_at is None or task.paused:
        return _Plan()  # a stale entry
    if task.scheduled_at > (fire_until or now):
        return _Plan(change=restore_entry(task, now))
    fired = fire_schedule(task, now, entropy=entropy)
    if fired.task.active_run is None:  # a misfire the task's policy skips
        return _Plan(change=fired)
    return _Plan(change=fired, dispatch=_dispatch_of(fired.task))


def _moment(seconds: float) -> datetime:
    """The UTC time of unix ``seconds`` (a ``scheduled_tasks`` score)."""
    return datetime.fromtimestamp(seconds, UTC)


def _recover_lost_run(
    task: Task, run: Run | UnreadableRun, now: datetime, entropy: Entropy
) -> _Plan:
    if isinstance(run, UnreadableRun):
        recovered = lose_unreadable_run(task, run, now, entropy=entropy)
    else:
        recovered = lose_run(task, run, now, entropy=entropy)
    log.warning(
        "run %s/%s was lost (%s)",
        task.id,
        run.run_id,
        recovered.run.error,
        extra=about(task.id, run.run_id),
    )
    if recovered.task.active_run is None:  # out of attempts: failed
        return _Plan(change=recovered)
    return _Plan(change=recovered, dispatch=_dispatch_of(recovered.task))


def _set_aside(task: Task, problem: Exception, now: datetime, entropy: Entropy) -> _Plan:
    """The plan for a task that planning failed on (say, a recurrence the calendar cannot
    compute): unscheduled, with a skipped run saying why, so that one bad document neither
    stops the batch nor comes back on every pass. A run still active keeps its entry:
    its claim is left to run out, and the task planned again then."""
    log.error(
        "cannot plan task %r; unscheduling it", task.id, exc_info=problem, extra=about(task.id)
    )
    reason = f"{type(problem).__name__}: {problem}"
    change = set_aside(task, reason, now, entropy=entropy)
    return _Plan(change=change, keep_claim=task.active_run is not None)


class Scheduler:
    """Dispatches due tasks; any number may run against one store and broker."""

    def __init__(
        self,
        store: TaskStore,
        broker: Broker,
        *,
        lease_seconds: float,
        lookahead_seconds: float = 0.0,
        batch_size: int = 500,
        clock: Callable[[], datetime] = utcnow,
        entropy: Entropy = ENTROPY,
    ) -> None:
        self._store = store
        self._broker = broker
        self._lease = timedelta(seconds=lease_seconds)
        self._lookahead = timedelta(seconds=lookahead_seconds)
        # Until then, wait for entries without looking ahead (a run lease is in reach).
        self._no_lookahead_until = datetime.min.replace(tzinfo=UTC)
        self._batch_size = batch_size
        self._clock = clock
        self._entropy = entropy
        self._token = f"{worker_name()}:{secrets.token_hex(4)}"
        # After a store or broker outage, leases get a period to be renewed before an
        # expired one is taken for a lost run.
        self._in_outage = False
        self._reap_not_before = datetime.min.replace(tzinfo=UTC)

    async def run(
        self, stopping: anyio.Event, *, task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Dispatch due tasks until ``stopping`` is set."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_set, stopping, tg.cancel_scope)
            await self._store.ping()
            await self._broker.ping()
            await tg.start(self.reap_dead_letters)
            task_status.started()
            backoff = Backoff()
            while True:
                try:
                    if await self.dispatch_due() < self._batch_size:
                        await self._store.wait_for_due(
                            max_wait=RESYNC_SECONDS, ahead=self._wait_ahead()
                        )
                except OUTAGES as exc:
                    # Claims already taken stay leased: nothing is lost while we wait.
                    # Consumers could not renew their leases meanwhile either: give them
                    # a lease period once the outage is over before taking runs for lost.
                    self._in_outage = True
                    await backoff.wait("scheduler cannot dispatch", exc)
                else:
                    backoff.reset()
                    if self._in_outage:
                        self._in_outage = False
                        self._reap_not_before = self._clock() + self._lease

    def _wait_ahead(self) -> float:
        """How long before the earliest entry to wake: the look-ahead, unless a run lease
        that has not run out is within it."""
        if self._clock() < self._no_lookahead_until:
            return 0.0
        return self._lookahead.total_seconds()

    async def dispatch_due(self) -> int:
        """Dispatch one batch of tasks due within the look-ahead; return how many entries
        were claimed."""
        now = self._clock()
        claims = await self._store.claim_due(
            now=timestamp(now + self._lookahead),
            limit=self._batch_size,
            lease=self._lease.total_seconds(),
            token=self._token,
        )
        if not claims:
            return 0
        CLAIMS.inc(len(claims))
        claimed = {claim.task_id: claim for claim in claims if claim.task is not None}
        plans = {
            task_id: await self._plan(claim.task, now, _moment(claim.due))
            for task_id, claim in claimed.items()
            if claim.task is not None
        }
        for task_id, plan in plans.items():
            if plan.lease_ahead:
                lease_end = _moment(claimed[task_id].due)
                self._no_lookahead_until = max(self._no_lookahead_until, lease_end)
        finished = [c.task_id for c in claims if c.task is None]
        changes = [p.change for p in plans.values() if p.change is not None]
        applied = await self._commit_each(changes)
        for change, ok in zip(changes, applied, strict=True):
            if not ok:
                # The task changed since the claim read it: plan again from what it is now.
                replanned = await self._replan(claimed[change.task_id], now)
                if replanned is None:
                    del plans[change.task_id]  # stays leased, so it is retried
                else:
                    plans[change.task_id] = replanned

        dispatches: list[Dispatch] = []
        for task_id, plan in plans.items():
            if plan.dispatch is not None:
                dispatches.append(plan.dispatch)
            elif not plan.keep_claim:
                finished.append(task_id)
        confirmed = await self._broker.publish(dispatches) if dispatches else []
        DISPATCHES.inc(len(confirmed))
        if len(confirmed) < len(dispatches):
            log.warning(
                "broker confirmed %d of %d dispatches; the rest are retried when their lease ends",
                len(confirmed),
                len(dispatches),
            )
        finished += [d.task_id for d in confirmed]
        await self._store.release_claims(token=self._token, task_ids=finished)
        return len(claims)

    async def _commit_each(self, changes: list[Transition]) -> list[bool]:
        """Commit each change on its own; whether each was applied (and counted). One
        that triggers a chain reads its tasks first and is committed with them."""
        batched = [c for c in changes if not involves_chain(c)]
        applied = dict(
            zip(
                (id(c) for c in batched),
                await self._store.commit_each([TaskChange.of(c) for c in batched]),
                strict=True,
            )
        )
        for change in batched:
            if applied[id(change)]:
                count_committed(change)
        for change in changes:
            if id(change) not in applied:
                applied[id(change)] = await commit_alone(self._store, change)
        return [applied[id(c)] for c in changes]

    async def reap_dead_letters(
        self, *, task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Send again, later, the dispatch messages the broker gave up on, and fail their
        run once that happened ``DEAD_LETTER_LIMIT`` times: no task waits in ``pending``
        for a message that will never come. Started once consuming; runs until cancelled."""
        async with self._broker.consume_dead_letters(prefetch=DEAD_LETTER_PREFETCH) as dead:
            task_status.started()
            async for delivery in dead:
                await self._reap(delivery)

    async def _reap(self, delivery: Delivery) -> None:
        dispatch = delivery.dispatch
        if dispatch is None:
            # A consumer rejected it as not a dispatch: nobody can act on it.
            log.error("dropping a dead-lettered message that is not a dispatch")
        else:
            await until_available(lambda: self._dead_lettered(dispatch), "record a dead letter")
        await settle(delivery.ack)
        DEAD_LETTERS.inc()

    async def _dead_lettered(self, dispatch: Dispatch) -> None:
        try:
            task, run = await self._store.get_task_and_run(dispatch.task_id, dispatch.run_id)
        except (UnreadableTask, UnreadableRun) as unreadable:
            log.error(
                "dropping a dead letter for %s/%s: %s",
                dispatch.task_id,
                dispatch.run_id,
                unreadable,
                extra=about(dispatch.task_id, dispatch.run_id),
            )
            return
        if task is None or run is None or run.status != RunStatus.QUEUED:
            return  # the run started or ended through another message, or is gone
        queued = run

        def plan(task: Task) -> Transition:
            # Sent again a lease period later, as if its claim had run out.
            now = self._clock()
            resend_at = now + self._lease
            return dead_lettered(task, queued, now, resend_at=resend_at, entropy=self._entropy)

        try:
            change = await transact(self._store, task.id, plan, known=task)
        except DomainError as exc:
            log.info(
                "dead letter for %s/%s: %s",
                dispatch.task_id,
                dispatch.run_id,
                exc,
                extra=about(dispatch.task_id, dispatch.run_id),
            )
            return
        counted = change.run
        log.warning(
            "the dispatch of run %s/%s was dead-lettered (%d of %d times): %s",
            dispatch.task_id,
            dispatch.run_id,
            counted.dead_letters,
            DEAD_LETTER_LIMIT,
            "the run failed" if counted.status == RunStatus.FAILED else "sending it again later",
            extra=about(dispatch.task_id, dispatch.run_id),
        )

    async def _running_run(self, task: Task) -> Run | None:
        """The run of a running task (claimed only when its lease ran out: rare)."""
        if task.status != TaskStatus.RUNNING or task.active_run is None:
            return None
        return await self._store.get_run(task.id, task.active_run.run_id)

    async def _plan(self, task: Task, now: datetime, entry_due: datetime) -> _Plan:
        """``plan_dispatch`` for one claimed task; a task it fails on is set aside."""
        running: Run | UnreadableRun | None
        try:
            running = await self._running_run(task)
        except UnreadableRun as unreadable:
            # Planned as any running task: a worker still running it renews its lease and
            # records its end (which writes the run afresh); if its lease ran out, the run
            # is recovered as lost from what the task knows of it.
            log.error(
                "%s: %s", unreadable, unreadable.reason, extra=about(task.id, unreadable.run_id)
            )
            running = unreadable
        extend = now + self._lease if self._in_outage or now < self._reap_not_before else None
        try:
            return plan_dispatch(
                task,
                now,
                running,
                fire_until=now + self._lookahead,
                entry_due=entry_due,
                extend_lease_to=extend,
                entropy=self._entropy,
            )
        except Exception as exc:
            return _set_aside(task, exc, now, self._entropy)

    async def _replan(self, claim: Claim, now: datetime) -> _Plan | None:
        task_id = claim.task_id
        assert claim.task is not None
        for _ in range(MAX_REPLANS):
            try:
                task = await self._store.get_task(task_id)
            except UnreadableTask as unreadable:
                # As when the claim itself finds it so (``TaskStore.claim_due``).
                log.error(
                    "%s; its schedule entry is dropped and the document left as it is",
                    unreadable,
                    extra=about(task_id),
                )
                return _Plan()
            if task is None:
                return _Plan()
            if task.status == TaskStatus.RUNNING and claim.task.status != TaskStatus.RUNNING:
                # It started meanwhile: its entry is its run's lease now, not our claim.
                return _Plan()
            plan = await self._plan(task, now, _moment(claim.due))
            if plan.change is None or await self._commit_each([plan.change]) == [True]:
                return plan
        log.warning(
            "task %r kept changing; its dispatch is retried when the lease ends",
            task_id,
            extra=about(task_id),
        )
        return None

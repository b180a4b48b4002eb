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
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus as StartedStatus

from app.domain import (
    ACTIVE_STATUSES,
    DEAD_LETTER_LIMIT,
    DomainError,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    dead_lettered,
    due_after_run,
    fire_schedule,
    lose_run,
    timestamp,
    touch,
    utcnow,
    worker_name,
)
from app.outages import OUTAGES, Backoff, settle, until_available
from app.ports import (
    Broker,
    Delivery,
    Dispatch,
    DueAt,
    Store,
    TaskChange,
    due_at,
)
from app.service import transact
from app.stopping import cancel_when_set

log = logging.getLogger(__name__)

# Re-read the schedule at least this often even without a wake-up, in case a
# notification was lost with a dropped connection.
RESYNC_SECONDS = 5.0
MAX_REPLANS = 20
DEAD_LETTER_PREFETCH = 10


@dataclass(frozen=True, slots=True)
class _Plan:
    """What dispatching one claimed task takes: a change to commit first, and/or a message."""

    change: TaskChange | None = None
    dispatch: Dispatch | None = None


def plan_dispatch(
    task: Task, now: float, running: Run | None = None, *, extend_lease_to: float | None = None
) -> _Plan:
    """Decide what a claimed entry of ``scheduled_tasks`` means for its task now.

    ``running`` is the task's active run when the task is running. With
    ``extend_lease_to``, an expired run lease is extended rather than taken for lost.
    """
    if task.status == TaskStatus.PENDING and task.active_run is not None:
        # Queued by "execute", or by a scheduler that died before its publish was confirmed.
        run = task.active_run
        return _Plan(dispatch=Dispatch(task_id=task.id, run_id=run.run_id, attempt=run.attempt))
    if task.status == TaskStatus.RUNNING and running is not None:
        # A running task's entry is its run's lease: due means nobody renewed it ...
        if extend_lease_to is None:
            return _recover_lost_run(task, running)
        # ... unless the store was just out of reach for everyone, consumers included.
        extended = touch(task, utcnow())
        lease = DueAt(extend_lease_to)
        return _Plan(change=TaskChange(task.id, task.revision, extended, schedule=lease))
    if task.status in ACTIVE_STATUSES or task.scheduled_at is None or task.paused:
        return _Plan()  # a stale entry
    due = timestamp(task.scheduled_at)
    if due > now:
        repaired = touch(task, utcnow())
        return _Plan(change=TaskChange(task.id, task.revision, repaired, schedule=DueAt(due)))
    fired, run = fire_schedule(task, utcnow())
    if run.status == RunStatus.SKIPPED:  # a misfire the task's policy skips
        change = TaskChange(task.id, task.revision, fired, [run], due_at(fired.scheduled_at))
        return _Plan(change=change)
    return _Plan(
        change=TaskChange(task.id, task.revision, fired, runs=[run]),
        dispatch=Dispatch(task_id=task.id, run_id=run.run_id, attempt=run.attempt),
    )


def _recover_lost_run(task: Task, run: Run) -> _Plan:
    now = utcnow()
    recovered, runs = lose_run(task, run, now)
    log.warning("run %s/%s was lost (%s)", task.id, run.run_id, runs[0].error)
    if recovered.active_run is None:
        # Out of attempts: failed. What is due next becomes due, as after any run.
        schedule = due_at(due_after_run(recovered))
        return _Plan(change=TaskChange(task.id, task.revision, recovered, runs, schedule))
    fresh = recovered.active_run
    return _Plan(
        change=TaskChange(task.id, task.revision, recovered, runs),
        dispatch=Dispatch(task_id=task.id, run_id=fresh.run_id, attempt=fresh.attempt),
    )


class Scheduler:
    """Dispatches due tasks; any number may run against one store and broker."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        lease_seconds: float,
        batch_size: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._broker = broker
        self._lease = lease_seconds
        self._batch_size = batch_size
        self._clock = clock
        self._token = f"{worker_name()}:{secrets.token_hex(4)}"
        self._reap_not_before = 0.0

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
                        await self._store.wait_for_due(max_wait=RESYNC_SECONDS)
                except OUTAGES as exc:
                    # Claims already taken stay leased: nothing is lost while we wait.
                    # Consumers could not renew their leases meanwhile either: give them
                    # a lease period once the outage is over before taking runs for lost.
                    self._reap_not_before = math.inf
                    await backoff.wait("scheduler cannot dispatch", exc)
                else:
                    backoff.reset()
                    if self._reap_not_before == math.inf:
                        self._reap_not_before = self._clock() + self._lease

    async def dispatch_due(self) -> int:
        """Dispatch one batch of due tasks; return how many entries were claimed."""
        now = self._clock()
        claims = await self._store.claim_due(
            now=now, limit=self._batch_size, lease=self._lease, token=self._token
        )
        if not claims:
            return 0
        extend = now + self._lease if now < self._reap_not_before else None
        plans = {
            claim.task_id: plan_dispatch(
                claim.task, now, await self._running_run(claim.task), extend_lease_to=extend
            )
            for claim in claims
            if claim.task is not None
        }
        finished = [c.task_id for c in claims if c.task is None]
        changes = [p.change for p in plans.values() if p.change is not None]
        applied = await self._store.commit_each(changes)
        for change, ok in zip(changes, applied, strict=True):
            if not ok:
                # The task changed since the claim read it: plan again from what it is now.
                replanned = await self._replan(change.task_id, now)
                if replanned is None:
                    del plans[change.task_id]  # stays leased, so it is retried
                else:
                    plans[change.task_id] = replanned

        dispatches: list[Dispatch] = []
        for task_id, plan in plans.items():
            if plan.dispatch is not None:
                dispatches.append(plan.dispatch)
            else:
                finished.append(task_id)
        confirmed = await self._broker.publish(dispatches) if dispatches else []
        if len(confirmed) < len(dispatches):
            log.warning(
                "broker confirmed %d of %d dispatches; the rest are retried when their lease ends",
                len(confirmed),
                len(dispatches),
            )
        finished += [d.task_id for d in confirmed]
        await self._store.release_claims(token=self._token, task_ids=finished)
        return len(claims)

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

    async def _dead_lettered(self, dispatch: Dispatch) -> None:
        task, run = await self._store.get_task_and_run(dispatch.task_id, dispatch.run_id)
        if task is None or run is None or run.status != RunStatus.QUEUED:
            return  # the run started or ended through another message, or is gone
        queued = run

        def plan(task: Task) -> TaskChange:
            changed, runs = dead_lettered(task, queued, utcnow())
            if changed.active_run is not None and changed.active_run.run_id == queued.run_id:
                # Sent again a lease period later, as if its claim had run out.
                again = DueAt(self._clock() + self._lease)
                return TaskChange(task.id, task.revision, changed, runs, again)
            next_due = due_at(due_after_run(changed))
            return TaskChange(task.id, task.revision, changed, runs, next_due)

        try:
            change = await transact(self._store, task.id, plan, known=task)
        except DomainError as exc:
            log.info("dead letter for %s/%s: %s", dispatch.task_id, dispatch.run_id, exc)
            return
        counted = change.runs[0]
        log.warning(
            "the dispatch of run %s/%s was dead-lettered (%d of %d times): %s",
            dispatch.task_id,
            dispatch.run_id,
            counted.dead_letters,
            DEAD_LETTER_LIMIT,
            "the run failed" if counted.status == RunStatus.FAILED else "sending it again later",
        )

    async def _running_run(self, task: Task) -> Run | None:
        """The run of a running task (claimed only when its lease ran out: rare)."""
        if task.status != TaskStatus.RUNNING or task.active_run is None:
            return None
        return await self._store.get_run(task.id, task.active_run.run_id)

    async def _replan(self, task_id: str, now: float) -> _Plan | None:
        for _ in range(MAX_REPLANS):
            task = await self._store.get_task(task_id)
            if task is None:
                return _Plan()
            extend = now + self._lease if now < self._reap_not_before else None
            plan = plan_dispatch(task, now, await self._running_run(task), extend_lease_to=extend)
            if plan.change is None or await self._store.commit_each([plan.change]) == [True]:
                return plan
        log.warning("task %r kept changing; its dispatch is retried when the lease ends", task_id)
        return None

"""The notifier: delivers the notifications of the store's outbox (``NotificationOutbox``)
as webhooks. It runs in the scheduler role; any number of notifiers may share an outbox.

Each delivery is leased from the outbox for the request's timeout plus a lease period,
so one notifier at a time sends it, and one that dies mid-delivery leaves it to be sent
again by another when the lease ends: delivery is at least once, and a receiver drops
duplicates by the ``X-Taskq-Delivery`` header (the same for every attempt).

A webhook is a POST of the JSON body ``app.notifications.body_of`` makes, signed with
``TASKQ_WEBHOOK_SECRET`` (``X-Taskq-Signature: sha256=<hex HMAC of the body>``); a
success ping is a GET without a body, as ping services (healthchecks.io, Cronitor) take
it. A 2xx answer delivers it. A connection error, a timeout, a 429 or a 5xx is tried
again after a backoff (exponential, with jitter) until ``TASKQ_NOTIFY_ATTEMPTS`` were
made; any other answer gives up at once (the receiver refuses the request itself).
Nothing here waits on a run: consumers only write the outbox entry in the commit they
make anyway, and at most ``TASKQ_NOTIFY_CONCURRENCY`` requests are in flight.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from datetime import datetime

import anyio
import httpx
from anyio.abc import TaskGroup
from anyio.abc import TaskStatus as StartedStatus

from app.domain import ENTROPY, Entropy, RunStatus, UnreadableRun, utcnow, worker_name
from app.logs import about, handling
from app.notifications import (
    Notification,
    NotifyEvent,
    OutboxEntry,
    body_of,
    delivered,
    not_delivered,
    retryable_status,
    signature,
)
from app.outages import OUTAGES, Backoff, until_available
from app.ports import Store
from app.stopping import cancel_when_set

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""How long the notifier waits at most before looking at the outbox again: a new
notification is sent within about this long of the commit that caused it."""
NO_SECRET_WARNING = (
    "TASKQ_WEBHOOK_SECRET is not set: notifications are sent unsigned, and receivers "
    "cannot tell them from forged ones"
)
USER_AGENT = "taskq-notifier"


class Notifier:
    """Delivers due notifications until cancelled."""

    def __init__(
        self,
        store: Store,
        *,
        secret: str | None,
        public_url: str,
        lease_seconds: float,
        timeout: float,
        max_attempts: int,
        first_delay: float,
        concurrency: int,
        clock: Callable[[], datetime] = utcnow,
        entropy: Entropy = ENTROPY,
    ) -> None:
        self._store = store
        self._secret = None if secret is None else secret.encode()
        self._public_url = public_url
        self._lease = lease_seconds + timeout
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._first_delay = first_delay
        self._concurrency = concurrency
        self._clock = clock
        self._entropy = entropy
        self._token = f"{worker_name()}:{secrets.token_hex(4)}"
        self._in_flight = 0
        self._slot_freed = anyio.Event()

    async def run(
        self, stopping: anyio.Event, *, task_status: StartedStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver notifications until ``stopping`` is set; those in flight then are
        cut short and sent again when their lease ends."""
        limits = httpx.Limits(max_connections=self._concurrency)
        timeout = httpx.Timeout(self._timeout)
        async with (
            httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False) as client,
            anyio.create_task_group() as deliveries,
        ):
            deliveries.start_soon(cancel_when_set, stopping, deliveries.cancel_scope)
            await self._store.ping()
            task_status.started()
            backoff = Backoff()
            while True:
                try:
                    await self._deliver_due(client, deliveries)
                except OUTAGES as exc:
                    await backoff.wait("notifier cannot read the outbox", exc)
                else:
                    backoff.reset()

    async def _deliver_due(self, client: httpx.AsyncClient, deliveries: TaskGroup) -> None:
        """Start delivering what is due, as many as there are free slots; then wait
        until more may be due or a slot frees up."""
        free = self._concurrency - self._in_flight
        if free == 0:
            with anyio.move_on_after(POLL_SECONDS):
                await self._slot_freed.wait()
            return
        claimed = await self._store.claim_notifications(
            now=time.time(), limit=free, lease=self._lease, token=self._token
        )
        for entry in claimed:
            self._in_flight += 1
            deliveries.start_soon(self._deliver, client, entry, name=entry.notification.id)
        if len(claimed) < free:
            await anyio.sleep(await self._until_next_due())

    async def _until_next_due(self) -> float:
        due = await self._store.next_notification_due()
        if due is None:
            return POLL_SECONDS
        return min(POLL_SECONDS, max(0.0, due - time.time()))

    async def _deliver(self, client: httpx.AsyncClient, entry: OutboxEntry) -> None:
        note = entry.notification
        try:
            with handling(note.task_id, note.run_id):
                await self._attempt(client, entry)
        finally:
            self._in_flight -= 1
            self._slot_freed.set()
            self._slot_freed = anyio.Event()

    async def _attempt(self, client: httpx.AsyncClient, entry: OutboxEntry) -> None:
        """Send ``entry`` once and record how it went."""
        note = entry.notification
        if note.event == NotifyEvent.ON_STILL_RUNNING and not await self._still_running(note):
            await until_available(
                lambda: self._store.drop_notification(entry, token=self._token),
                "drop a notification",
            )
            return
        error, retryable = await self._send(client, note)
        now = self._clock()
        if error is None:
            settled, retry_at = delivered(entry, now), None
            log.info("notification %s delivered to %s", note.id, note.url)
        else:
            settled, retry_at = not_delivered(
                entry,
                error,
                now,
                retryable=retryable,
                max_attempts=self._max_attempts,
                first_delay=self._first_delay,
                jitter=self._entropy.jitter(),
            )
            outcome = "trying again later" if retry_at is not None else "giving up"
            log.warning("notification %s to %s: %s; %s", note.id, note.url, error, outcome)
        await until_available(
            lambda: self._store.settle_notification(settled, token=self._token, retry_at=retry_at),
            "record a notification's delivery",
        )

    async def _still_running(self, note: Notification) -> bool:
        try:
            run = await until_available(
                lambda: self._store.get_run(note.task_id, note.run_id), "read a run"
            )
        except UnreadableRun as unreadable:
            # Whether it runs cannot be told: say nothing rather than something wrong.
            log.error(
                "%s: %s; its %s notification is dropped",
                unreadable,
                unreadable.reason,
                note.event.value,
                extra=about(note.task_id, note.run_id),
            )
            return False
        return run is not None and run.status == RunStatus.RUNNING

    async def _send(self, client: httpx.AsyncClient, note: Notification) -> tuple[str | None, bool]:
        """Make one request; ``None`` when it was delivered, else what went wrong and
        whether trying again may help."""
        try:
            request = self._request(client, note)
        except httpx.InvalidURL as exc:
            return f"invalid URL: {exc}", False
        with anyio.move_on_after(self._timeout):
            try:
                response = await client.send(request, stream=True)
            except httpx.TransportError as exc:
                return f"{type(exc).__name__}: {exc}", True  # ConnectError: ...
            await response.aclose()  # the answer's body is not needed
            if response.is_success:
                return None, False
            return f"HTTP {response.status_code}", retryable_status(response.status_code)
        return f"no answer within {self._timeout:g} s", True

    def _request(self, client: httpx.AsyncClient, note: Notification) -> httpx.Request:
        headers = {
            "User-Agent": USER_AGENT,
            "X-Taskq-Event": note.event.value,
            "X-Taskq-Delivery": note.id,
        }
        if note.event == NotifyEvent.SUCCESS_PING:
            return client.build_request("GET", note.url, headers=headers)
        body = body_of(note, public_url=self._public_url, sent_at=self._clock())
        headers["Content-Type"] = "application/json"
        if self._secret is not None:
            headers["X-Taskq-Signature"] = signature(self._secret, body)
        return client.build_request("POST", note.url, headers=headers, content=body)

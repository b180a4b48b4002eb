"""The notifier over the in-memory store, on asyncio and trio: what it sends, how it
gives up, and how it records each try (the real receiver is a Hypercorn server)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from app.adapters.memory_store import MemoryStore
from app.domain import Notify, Outcome, Task, finish_run, queue_run, start_run, utcnow
from app.notifications import DeliveryState, NotificationRecord
from app.notifier import Notifier
from app.ports import TaskChange
from tests.conftest import eventually
from tests.webhook_receiver import SECRET, receiving


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def notifier_running(store: MemoryStore, **options: Any) -> AsyncIterator[None]:
    settings: dict[str, Any] = {
        "secret": SECRET,
        "public_url": "http://taskq.test",
        "lease_seconds": 5,
        "timeout": 2,
        "max_attempts": 3,
        "first_delay": 0.05,
        "concurrency": 4,
        **options,
    }
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(Notifier(store, **settings).run, stopping)
        yield
        stopping.set()


async def completed_run(store: MemoryStore, notify: Notify) -> str:
    """A task with ``notify`` whose run completed, committed as a consumer does."""
    now = utcnow()
    task = Task(id="t", name="t", command="true", created_at=now, updated_at=now, notify=notify)
    await store.commit(TaskChange(task.id, None, task))
    queued = queue_run(task, now)
    await store.commit(TaskChange.of(queued))
    started = start_run(queued.task, queued.run, "w", now, lease_until=now + timedelta(seconds=9))
    await store.commit(TaskChange.of(started))
    outcome = Outcome(exit_code=0, duration=0.1, output="", truncated=False)
    await store.commit(TaskChange.of(finish_run(started.task, started.run, outcome, now)))
    return started.run.run_id


async def settled_record(store: MemoryStore, run_id: str) -> NotificationRecord:
    record: NotificationRecord | None = None

    async def settled() -> bool:
        nonlocal record
        [record] = (await store.notification_records([run_id]))[run_id]
        return record.state != DeliveryState.PENDING

    await eventually(settled, within=10)
    assert record is not None
    return record


async def test_a_hook_is_posted_signed_and_recorded_delivered() -> None:
    store = MemoryStore(run_history=10)
    async with receiving() as receiver, notifier_running(store):
        run_id = await completed_run(store, Notify(on_success=receiver.to("ok/s")))
        record = await settled_record(store, run_id)
    assert (record.state, record.attempts, record.last_error) == (DeliveryState.DELIVERED, 1, None)
    assert record.delivered_at is not None and record.delivered_at <= datetime.now(UTC)
    [hook] = receiver.at("ok/s")
    assert hook.signed
    assert hook.json["run"]["url"] == f"http://taskq.test/tasks/t/runs/{run_id}"


async def test_an_answer_other_than_429_or_5xx_gives_up_at_once() -> None:
    store = MemoryStore(run_history=10)
    async with receiving() as receiver, notifier_running(store):
        run_id = await completed_run(store, Notify(on_success=receiver.to("gone/s")))
        record = await settled_record(store, run_id)
    assert (record.state, record.attempts, record.last_error) == (
        DeliveryState.FAILED,
        1,
        "HTTP 404",
    )
    assert len(receiver.at("gone/s")) == 1


async def test_an_unreachable_receiver_is_tried_until_the_last_attempt() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/hook"
        store = MemoryStore(run_history=10)
        async with notifier_running(store, max_attempts=3):
            run_id = await completed_run(store, Notify(on_success=url))
            record = await settled_record(store, run_id)
    assert (record.state, record.attempts) == (DeliveryState.FAILED, 3)
    assert record.last_error is not None and record.last_error.startswith("ConnectError: ")

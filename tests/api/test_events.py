"""``GET /events``: what is refused before a stream starts, and how the stream says it.

In process, httpx's ASGI transport hands over a response only once it is complete, and
an event stream never is: the stream itself is checked end to end (tests/e2e/
test_events.py) and its messages here, from the batches the store hands out."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import UTC, datetime

import pytest
from litestar.response import ServerSentEventMessage

from app.api import _event_stream  # pyright: ignore[reportPrivateUsage]
from app.events import Event, EventType
from app.ports import EventBatch
from tests.api.conftest import Served
from tests.api.test_api import assert_problem

AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("after", ["yesterday", "12", "1-2-3", "-1-0", "1-2 "])
async def test_a_resume_point_that_is_no_event_id_is_a_400(served: Served, after: str) -> None:
    assert_problem(await served.client.get("/events", params={"after": after}), 400, "(after)")
    response = await served.client.get("/events", headers={"Last-Event-ID": after})
    assert_problem(response, 400, "(last_event_id)")


async def test_an_event_id_beyond_what_a_stream_id_holds_is_a_400(served: Served) -> None:
    too_big = "1-99999999999999999999"
    assert_problem(await served.client.get("/events", params={"after": too_big}), 400, too_big)


async def test_a_task_id_that_no_task_can_have_is_a_400(served: Served) -> None:
    assert_problem(await served.client.get("/events", params={"task_id": "a b"}), 400, "task_id")


def event(event_id: str, task_id: str, kind: EventType = EventType.TASK_CREATED) -> Event:
    return Event(type=kind, at=AT, task_id=task_id).logged_as(event_id)


async def messages(*batches: EventBatch, task_id: str | None = None) -> list[bytes]:
    async def handed_out() -> AsyncGenerator[EventBatch]:
        for batch in batches:
            yield batch

    return [m.encode() async for m in _event_stream(handed_out(), task_id)]


def sent(message: ServerSentEventMessage) -> bytes:
    return message.encode()


async def test_each_event_goes_out_with_its_id_type_and_json() -> None:
    [message] = await messages(EventBatch([event("5-0", "a")]))
    data = '{"id":"5-0","type":"task.created","at":"2026-01-01T00:00:00Z","task_id":"a"}'
    assert message == sent(ServerSentEventMessage(id="5-0", event="task.created", data=data))
    assert message.decode().split("\r\n")[:3] == ["id: 5-0", "event: task.created", f"data: {data}"]


async def test_missed_events_are_announced_with_a_reset_before_the_oldest_kept() -> None:
    reset, first = await messages(EventBatch([event("9-0", "a")], missed="9-0"))
    assert reset == sent(ServerSentEventMessage(event="reset", data='{"oldest":"9-0"}'))
    assert first.startswith(b"id: 9-0")


async def test_a_quiet_log_sends_a_keepalive_comment() -> None:
    assert await messages(EventBatch([])) == [
        sent(ServerSentEventMessage(data=None, comment="keepalive"))
    ]


async def test_a_task_filter_keeps_that_tasks_events_only() -> None:
    batch = EventBatch([event("1-0", "a"), event("2-0", "b"), event("3-0", "a")])
    sent_ids = [m.split(b"\r\n")[0] for m in await messages(batch, task_id="a")]
    assert sent_ids == [b"id: 1-0", b"id: 3-0"]

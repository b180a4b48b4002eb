"""The CLI's reading of ``text/event-stream`` (the HTML spec's rules, not a guess)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
from litestar.response.sse import ServerSentEventMessage

from cli.client import ApiClient, _server_sent_events  # pyright: ignore[reportPrivateUsage]


async def lines_of(text: str) -> AsyncIterator[str]:
    for line in text.splitlines():
        yield line


async def events_of(text: str) -> list[tuple[str, str]]:
    return [(event, data) async for event, data, _ in _server_sent_events(lines_of(text))]


async def test_multi_line_data_joins_with_newlines_and_comments_are_skipped() -> None:
    text = ": hello\nevent: output\ndata: one\n: between\ndata:two\ndata\n\ndata: x\n\n"
    assert await events_of(text) == [("output", "one\ntwo\n"), ("message", "x")]


async def test_a_block_without_data_dispatches_nothing() -> None:
    assert await events_of("event: output\n\n: keepalive\n\nid: 3\n\n") == []


async def test_keep_alives_between_events_are_not_decoded_as_output() -> None:
    """A quiet run's keep-alive, as Litestar encodes a comment (with or without an empty
    ``data:`` line), between two events: ``logs --follow`` used to die on it."""
    body = b"".join(
        [
            ServerSentEventMessage(event="output", data=json.dumps({"text": "a\n"})).encode(),
            ServerSentEventMessage(comment="keepalive").encode(),
            ServerSentEventMessage(data=None, comment="keepalive").encode(),
            ServerSentEventMessage(event="end", data="null").encode(),
        ]
    )

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(answer), base_url="http://taskq"
    ) as http:
        events = [event async for event in ApiClient(http).run_output("t", "r", follow=True)]
    assert events == [("output", {"text": "a\n"}), ("end", None)]
